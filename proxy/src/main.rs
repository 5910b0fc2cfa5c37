use clap::Parser;
use std::path::PathBuf;
use std::sync::Arc;

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
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("mtm-proxy: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(mtm_proxy::server::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mtm-proxy: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
