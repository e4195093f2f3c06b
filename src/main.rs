//! `tally`: parse arguments, start logging, dispatch, map errors to exit codes
//! (0 ok, 1 bad records found by `validate` or a failed verification of `compact`, 2 bad usage or configuration, 3 failure).

use clap::Parser;

use tally::cli::{dispatch, Cli, Exit};

fn main() {
    tally::tune_allocator();
    let cli = Cli::parse();
    tally::telemetry::init();
    match dispatch(cli) {
        Ok(Exit::Ok) => {}
        Ok(Exit::BadRecords | Exit::Mismatch) => std::process::exit(1),
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            // The reader went away (`tally export | head`): not an error.
        }
        Err(e) => {
            eprintln!("tally: {e:#}");
            let usage = e.downcast_ref::<tally::pipeline::PipelineError>().is_some();
            std::process::exit(if usage { 2 } else { 3 });
        }
    }
}
