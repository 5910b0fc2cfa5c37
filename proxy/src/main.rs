use clap::Parser;
use std::path::PathBuf;

/// mtm-proxy: PostgreSQL wire-protocol proxy for a multimaster cluster.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Configuration file (see conf/mtm-proxy.toml).
    #[arg(short, long, default_value = "conf/mtm-proxy.toml")]
    config: PathBuf,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MTM_PROXY_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let config = match mtm_proxy::config::Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("mtm-proxy: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    // The listener, health checks, signals and metrics; sessions run on
    // their own threads (`workers`).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        let shared = mtm_proxy::state::Shared::new(config, Some(args.config.clone()))?;
        mtm_proxy::server::run(shared).await
    });
    // Sessions still open after the shutdown timeout are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtm-proxy: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
