//! firerunner: runs one microVM (see the README for flags and exit codes).

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use snapvm::cli::FirerunnerArgs;
use snapvm::control::{Channel, Event};
use snapvm::vmm::{runner, seccomp, VmExit};

/// Exit code for a configuration or start-up error.
const EXIT_CONFIG: u8 = 1;

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let args = FirerunnerArgs::parse();
    let control = match args.control_fd.map(Channel::from_fd).transpose() {
        Ok(c) => c.map(Arc::new),
        Err(e) => {
            eprintln!("firerunner: error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let fail = |msg: String| {
        eprintln!("firerunner: error: {msg}");
        if let Some(c) = &control {
            c.send(&Event::Exit {
                code: i32::from(EXIT_CONFIG),
                reason: msg,
            });
        }
        ExitCode::from(EXIT_CONFIG)
    };
    let config = match args.vm_config() {
        Ok(c) => c,
        Err(e) => return fail(e.to_string()),
    };
    // Before any other thread starts: each confines itself as it starts
    // its steady-state loop.
    if args.vm.no_seccomp {
        log::warn!("--no_seccomp: the VMM's threads run without seccomp filters");
    } else {
        let t = Instant::now();
        if let Err(e) = seccomp::enable(config.writes_files()) {
            return fail(e.to_string());
        }
        log::info!("seccomp filters built in {} us", t.elapsed().as_micros());
    }
    let exit = match runner::run(&config, start, control.clone()) {
        Ok(exit) => exit,
        Err(e) => return fail(e.to_string()),
    };
    match &exit {
        VmExit::Fatal(msg) => log::error!("VM failed: {msg}"),
        VmExit::TripleFault(cpu) => log::error!("guest triple fault on vCPU {cpu}"),
        VmExit::AppFailed => log::error!("the guest reported that the app failed to load"),
        other => log::info!("VM stopped: {other:?}"),
    }
    let code = exit.code();
    if let Some(c) = &control {
        c.send(&Event::Exit {
            code,
            reason: format!("{exit:?}"),
        });
    }
    // The VM was torn down in order (vCPUs stopped, devices dropped).
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}
