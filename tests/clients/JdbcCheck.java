// The PostgreSQL JDBC driver through mtm-proxy of a 3-node cluster: TLS +
// SCRAM, prepared statements (server-side from the first use), a portal
// fetched in chunks (fetch size), COPY in and out (CopyManager), batches,
// transactions ended by Connection.commit() (pgjdbc sends COMMIT as a
// prepared statement), an error inside a transaction then ROLLBACK, LISTEN
// on one node and NOTIFY from another, two sessions on different nodes
// updating one row (exactly one 40001), and Statement.cancel() of
// pg_sleep. Settings from PG*; prints OK on success; the test then checks
// every node directly.
import java.io.*;
import java.sql.*;
import java.util.Properties;
import org.postgresql.PGConnection;
import org.postgresql.PGNotification;
import org.postgresql.copy.CopyManager;

public class JdbcCheck {
    static Connection connect() throws SQLException {
        String url = "jdbc:postgresql://" + System.getenv("PGHOST") + ":" + System.getenv("PGPORT") + "/postgres";
        Properties p = new Properties();
        p.setProperty("user", System.getenv("PGUSER"));
        p.setProperty("password", System.getenv("PGPASSWORD"));
        p.setProperty("sslmode", "require");
        p.setProperty("sslfactory", "org.postgresql.ssl.NonValidatingFactory");
        p.setProperty("prepareThreshold", "1");
        return DriverManager.getConnection(url, p);
    }

    static String nodeOf(Connection c) throws SQLException {
        try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("select current_setting('port')")) {
            rs.next();
            return rs.getString(1);
        }
    }

    static void check(boolean ok, String what) {
        if (!ok) throw new AssertionError(what);
    }

    public static void main(String[] args) throws Exception {
        try (Connection c = connect()) {
            try (Statement s = c.createStatement()) {
                s.execute("drop table if exists jdb; create table jdb(id int primary key, v text)");
            }
            try (PreparedStatement ps = c.prepareStatement("insert into jdb values (?, ?)")) {
                for (int i = 0; i < 50; i++) { ps.setInt(1, i); ps.setString(2, "v" + i); ps.executeUpdate(); }
            }
            CopyManager cm = c.unwrap(PGConnection.class).getCopyAPI();
            StringBuilder sb = new StringBuilder();
            for (int i = 50; i < 1050; i++) sb.append(i).append("\tc").append(i).append("\n");
            long copied = cm.copyIn("copy jdb from stdin", new StringReader(sb.toString()));
            check(copied == 1000, "copy in");
            StringWriter w = new StringWriter();
            cm.copyOut("copy (select id from jdb order by id) to stdout", w);
            check(w.toString().trim().split("\n").length == 1050, "copy out");

            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.setFetchSize(100);
                int n = 0;
                try (ResultSet rs = s.executeQuery("select id from jdb order by id")) { while (rs.next()) n++; }
                check(n == 1050, "portal chunks: " + n);
            }
            c.commit();
            try (Statement s = c.createStatement()) {
                try { s.execute("insert into jdb values (1, 'dup')"); check(false, "duplicate accepted"); }
                catch (SQLException e) { check("23505".equals(e.getSQLState()), "unique violation: " + e.getSQLState()); }
                try { s.execute("select 1"); check(false, "ran in aborted transaction"); }
                catch (SQLException e) { check("25P02".equals(e.getSQLState()), "in failed transaction: " + e.getSQLState()); }
            }
            c.rollback();

            // Batches in transactions ended by commit(), prepared COMMIT
            // included (prepareThreshold=1), several times over.
            for (int t = 0; t < 5; t++) {
                try (PreparedStatement ps = c.prepareStatement("insert into jdb values (?, ?)")) {
                    for (int i = 0; i < 20; i++) { ps.setInt(1, 2000 + t * 20 + i); ps.setString(2, "b"); ps.addBatch(); }
                    int[] counts = ps.executeBatch();
                    check(counts.length == 20, "batch");
                }
                c.commit();
            }
            c.setAutoCommit(true);
            try (Statement s = c.createStatement(); ResultSet rs = s.executeQuery("select count(*) from jdb")) {
                rs.next();
                check(rs.getInt(1) == 1150, "rows after batches: " + rs.getInt(1));
            }

            try (Connection l = connect(); Statement ls = l.createStatement(); Statement s = c.createStatement()) {
                check(!nodeOf(l).equals(nodeOf(c)), "listener and talker on different nodes");
                ls.execute("listen jdb_chan");
                s.execute("notify jdb_chan, 'hi'");
                PGNotification[] got = l.unwrap(PGConnection.class).getNotifications(10000);
                check(got != null && got.length == 1 && "hi".equals(got[0].getParameter()), "notification");
            }

            try (Statement s = c.createStatement()) {
                Thread t = new Thread(() -> { try { Thread.sleep(500); s.cancel(); } catch (Exception e) { throw new RuntimeException(e); } });
                t.start();
                try { s.execute("select pg_sleep(30)"); check(false, "not cancelled"); }
                catch (SQLException e) { check("57014".equals(e.getSQLState()), "cancel: " + e.getSQLState()); }
                t.join();
                try (ResultSet rs = s.executeQuery("select 1")) { rs.next(); check(rs.getInt(1) == 1, "after cancel"); }
            }
        }
        // Two sessions on different nodes update one row and commit
        // together: exactly one commits, the other gets 40001.
        try (Connection a = connect(); Connection b = connect()) {
            check(!nodeOf(a).equals(nodeOf(b)), "the two writers on different nodes");
            try (Statement s = a.createStatement()) {
                s.execute("drop table if exists jdb_acc; create table jdb_acc(id int primary key, v int)");
                s.execute("insert into jdb_acc values (1, 0)");
            }
            a.setAutoCommit(false);
            b.setAutoCommit(false);
            for (int round = 0; round < 3; round++) {
                for (Connection x : new Connection[] {a, b}) {
                    try (Statement s = x.createStatement()) { s.executeUpdate("update jdb_acc set v = v + 1 where id = 1"); }
                }
                String[] outcome = new String[2];
                Thread[] threads = new Thread[2];
                Connection[] both = {a, b};
                for (int i = 0; i < 2; i++) {
                    final int k = i;
                    threads[i] = new Thread(() -> {
                        try { both[k].commit(); outcome[k] = "ok"; }
                        catch (SQLException e) { outcome[k] = e.getSQLState(); }
                    });
                    threads[i].start();
                }
                for (Thread t : threads) t.join();
                check(("ok".equals(outcome[0]) && "40001".equals(outcome[1])) || ("40001".equals(outcome[0]) && "ok".equals(outcome[1])),
                    "exactly one of two conflicting commits: " + outcome[0] + " " + outcome[1]);
                for (Connection x : both) x.rollback();
            }
        }
        System.out.println("OK jdbc");
    }
}
