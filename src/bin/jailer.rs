//! jailer: sets up one VM's jail and runs firerunner in it (see
//! src/jail/jailer.rs); started by singlevm and multivm as root.

use std::process::ExitCode;

use clap::Parser;
use snapvm::jail::jailer::{self, JailerArgs};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    jailer::run(JailerArgs::parse())
}
