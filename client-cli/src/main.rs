//! The `chat-cli` binary: thin glue over the `chat_cli` library.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

/// mimalloc: `chat-cli bench` shares the machine with the nodes it measures, so it should
/// spend as little CPU as it can on allocation.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match chat_cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Usage, or what `--help`/`--version` print.
            let _ = e.print();
            return ExitCode::from(chat_cli::usage_exit_code(&e));
        }
    };
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "chat-cli: error: {e:#}");
            ExitCode::from(chat_cli::exit_code(&e))
        }
    }
}

/// Worker threads of `chat-cli bench`'s runtime.
const BENCH_THREADS: usize = 2;

fn run(cli: &chat_cli::Cli) -> anyhow::Result<()> {
    // The load generator reads every connection's pushes and answers: at tens of
    // thousands of messages per second one thread is its limit (a connection it reads too
    // slowly is closed by the server as a slow consumer), so it gets two; everything else
    // is one conversation at a time.
    let runtime = match &cli.command {
        chat_cli::Command::Bench(_) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(BENCH_THREADS)
            .enable_all()
            .build(),
        _ => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
    }
    .context("cannot start the async runtime")?;
    let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let text = runtime.block_on(chat_cli::execute(cli, color))?;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // The reader went away (`chat-cli … | head`): not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("cannot write to stdout"),
    }
}
