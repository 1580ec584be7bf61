//! firerunner: runs one microVM (see the README for flags and exit codes).
//! `firerunner shell ...` builds a VM shell and restores into it the
//! snapshot its controller names (src/vmm/shell.rs).

use std::ffi::OsString;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use snapvm::cli::{FirerunnerArgs, ShellArgs};
use snapvm::control::{Channel, Event};
use snapvm::vmm::shell::{self, Shell, Waited};
use snapvm::vmm::{runner, seccomp, VmExit};

/// What the command line asks for.
enum Mode {
    /// `firerunner shell ...`.
    Shell(ShellArgs),
    /// A VM booted or restored from its flags.
    Vm(Box<FirerunnerArgs>),
}

/// Exit code for a configuration or start-up error.
const EXIT_CONFIG: u8 = 1;

fn main() -> ExitCode {
    let start = Instant::now();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    let argv: Vec<OsString> = std::env::args_os().collect();
    let mode = if argv.get(1).is_some_and(|a| a == "shell") {
        Mode::Shell(ShellArgs::parse_from(&argv[1..]))
    } else {
        Mode::Vm(Box::new(FirerunnerArgs::parse_from(&argv)))
    };
    let control_fd = match &mode {
        Mode::Shell(s) => Some(s.control_fd),
        Mode::Vm(a) => a.control_fd,
    };
    let control = match control_fd.map(Channel::from_fd).transpose() {
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
    // Before any other thread starts, so that every thread inherits the mask.
    let signals = match runner::termination_signals() {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    let (config, shell, no_seccomp) = match mode {
        Mode::Shell(sa) => {
            let Some(control) = &control else {
                return fail("a shell needs its control channel".into());
            };
            let shell = match Shell::new(&sa) {
                Ok(s) => s,
                Err(e) => return fail(e.to_string()),
            };
            match shell::wait(&sa, control, &signals, start) {
                Ok(Waited::Restore(config)) => (*config, Some(shell), sa.no_seccomp),
                Ok(Waited::Stop(exit)) => return ended(&exit, Some(control)),
                Err(e) => return fail(e.to_string()),
            }
        }
        Mode::Vm(args) => match args.vm_config() {
            Ok(c) => (c, None, args.vm.no_seccomp),
            Err(e) => return fail(e.to_string()),
        },
    };
    // Before any other thread starts: each confines itself as it starts
    // its steady-state loop.
    if no_seccomp {
        log::warn!("--no_seccomp: the VMM's threads run without seccomp filters");
    } else {
        let t = Instant::now();
        if let Err(e) = seccomp::enable(config.writes_files()) {
            return fail(e.to_string());
        }
        log::info!("seccomp filters built in {} us", t.elapsed().as_micros());
    }
    match runner::run(&config, start, control.clone(), signals, shell) {
        Ok(exit) => ended(&exit, control.as_deref()),
        Err(e) => fail(e.to_string()),
    }
}

/// Logs why the VM ended, tells the controller, and returns its exit code.
fn ended(exit: &VmExit, control: Option<&Channel>) -> ExitCode {
    match exit {
        VmExit::Fatal(msg) => log::error!("VM failed: {msg}"),
        VmExit::TripleFault(cpu) => log::error!("guest triple fault on vCPU {cpu}"),
        VmExit::AppFailed => log::error!("the guest reported that the app failed to load"),
        other => log::info!("VM stopped: {other:?}"),
    }
    let code = exit.code();
    if let Some(c) = control {
        c.send(&Event::Exit {
            code,
            reason: format!("{exit:?}"),
        });
    }
    // The VM was torn down in order (vCPUs stopped, devices dropped).
    ExitCode::from(u8::try_from(code).unwrap_or(u8::MAX))
}
