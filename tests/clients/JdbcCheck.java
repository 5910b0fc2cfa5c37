// The PostgreSQL JDBC driver through mtm-proxy: TLS + SCRAM, prepared
// statements (server-side from the first use), a portal fetched in chunks
// (fetch size), COPY in and out (CopyManager), an error inside a
// transaction then ROLLBACK, LISTEN/NOTIFY, and Statement.cancel() of
// pg_sleep. Settings from PG*; prints OK on success.
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
            c.setAutoCommit(true);

            try (Connection l = connect(); Statement ls = l.createStatement(); Statement s = c.createStatement()) {
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
        System.out.println("OK jdbc");
    }
}
