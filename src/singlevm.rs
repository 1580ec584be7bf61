//! singlevm: one VM, JSON requests on stdin, one JSON response per line on
//! stdout, in order.
//!
//! Every input line gets exactly one output line. A line that is not JSON,
//! or larger than the frame limit, is answered with an error and the VM
//! keeps serving. A request that outlives `--request_timeout` kills the VM
//! (the VM is the unit of isolation) and is answered with a timeout error;
//! so is every later line, with "vm is gone", since no VM is left to serve
//! it. The exit status is 0 when the VM served until end of input, 1
//! otherwise.
//!
//! With `--dump_ws`, once the first request is answered singlevm sends
//! firerunner `ws_done` and waits until the working set is written (or
//! refused) before reading the next line; if none was written (also when
//! the first answer is an error) the exit status is 1.

use std::io::{BufRead, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::control::Event;
use crate::launcher::{self, CallError, LaunchError, VmProcess};
use crate::protocol::{ProtocolError, MAX_FRAME};

pub use crate::launcher::Launch;

#[derive(Debug, thiserror::Error)]
pub enum SingleVmError {
    #[error(transparent)]
    Launch(#[from] LaunchError),
    #[error("the guest agent failed its handshake: {0}")]
    Handshake(ProtocolError),
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
    #[error("waiting for firerunner failed: {0}")]
    Wait(std::io::Error),
    #[error("firerunner failed ({0}){1}")]
    Firerunner(std::process::ExitStatus, String),
    #[error("firerunner exited without writing the snapshot ({0}){1}")]
    NoSnapshot(std::process::ExitStatus, String),
}

pub struct Options {
    pub launch: Launch,
    pub boot_timeout: Duration,
    pub request_timeout: Option<Duration>,
    /// Wait for firerunner to exit instead of for the guest (snapshot runs),
    /// at most `boot_timeout`.
    pub force_exit: bool,
    /// `--dump_dir`: a `force_exit` run must end with the snapshot written.
    pub dump_dir: bool,
    /// `--dump_ws`: after the first request, have the working set written.
    pub dump_ws: bool,
}

/// Logs firerunner's phase timings received so far.
fn log_event(e: Event) {
    match e {
        Event::Ready { us } => log::info!("firerunner ready in: {us} us"),
        Event::BootDone { us } => log::info!("guest boot done at: {us} us"),
        Event::SnapshotPoint { us } => log::info!("guest snapshot point at: {us} us"),
        Event::Timestamp { us } => log::info!("guest timestamp at: {us} us"),
        Event::AppFailed { us } => log::warn!("guest app failed to load at: {us} us"),
        Event::SnapshotWritten { dir, create_us, .. } => {
            log::info!("snapshot written to {dir} in: {create_us} us")
        }
        Event::WsWritten {
            dir, pages, faults, ..
        } => log::info!("working set written to {dir}: {pages} pages, {faults} faults"),
        Event::WsFailed { reason, .. } => log::error!("working set not written: {reason}"),
        Event::SnapshotFailed { reason, .. } => log::error!("snapshot not written: {reason}"),
        // singlevm starts no shells.
        Event::ShellReady { us } => log::info!("shell ready in: {us} us"),
        Event::RestoreFailed { reason, .. } => log::error!("restore refused: {reason}"),
        Event::Exit { code, reason } => log::info!("firerunner exited {code}: {reason}"),
    }
}

fn log_phases(vm: &VmProcess) {
    for e in vm.events().try_iter() {
        log_event(e);
    }
}

/// How long firerunner may take to write a working set.
const WS_WRITE_LIMIT: Duration = Duration::from_secs(60);

/// `--dump_ws`: the first request is done; has firerunner write the
/// working set and waits for the outcome. Returns whether it was written.
fn finish_working_set(vm: &VmProcess) -> bool {
    if let Err(e) = vm.command(&crate::control::Command::WsDone) {
        log::error!("cannot ask firerunner to write the working set: {e}");
        return false;
    }
    let deadline = Instant::now() + WS_WRITE_LIMIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match vm.events().recv_timeout(left) {
            Ok(e @ Event::WsWritten { .. }) => {
                log_event(e);
                return true;
            }
            Ok(e @ (Event::WsFailed { .. } | Event::Exit { .. })) => {
                log_event(e);
                return false;
            }
            Ok(other) => log_event(other),
            Err(_) => {
                log::error!("firerunner did not write the working set within {WS_WRITE_LIMIT:?}");
                return false;
            }
        }
    }
}

enum Agent {
    Serving(UnixStream),
    Gone(String),
}

/// Whether a response line is an error response (an object with "error").
fn is_error(line: &str) -> bool {
    serde_json::from_str::<Value>(line).map_or(true, |v| v.get("error").is_some())
}

fn error_line(msg: impl std::fmt::Display) -> String {
    json!({ "error": msg.to_string() }).to_string()
}

/// Runs one VM over `input`, writing responses to `output`; returns the
/// process exit code.
pub fn run(
    opts: &Options,
    input: impl BufRead,
    mut output: impl Write,
) -> Result<i32, SingleVmError> {
    let mut vm = VmProcess::spawn(&opts.launch)?;
    if opts.force_exit {
        let status = vm.wait_for_exit(opts.boot_timeout)?;
        log::info!(
            "firerunner exited in: {} us",
            vm.spawned_at.elapsed().as_micros()
        );
        let mut written = false;
        for e in vm.events().try_iter() {
            written |= matches!(e, Event::SnapshotWritten { .. });
            log_event(e);
        }
        return if !status.success() {
            Err(SingleVmError::Firerunner(status, vm.failure_detail()))
        } else if opts.dump_dir && !written {
            // E.g. the guest's app died before its snapshot point and the
            // guest reset the machine.
            Err(SingleVmError::NoSnapshot(status, vm.failure_detail()))
        } else {
            Ok(0)
        };
    }
    let stream = vm.wait_for_guest(opts.boot_timeout)?;
    if let Err(e) = launcher::handshake(&stream, None) {
        return Err(SingleVmError::Handshake(e));
    }
    log_phases(&vm);
    log::info!("VM ready in: {} us", vm.spawned_at.elapsed().as_micros());

    let mut agent = Agent::Serving(stream);
    // `--dump_ws`: Some(written?) once the first request is done.
    let mut ws_written = None;
    for line in input.split(b'\n') {
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                log::error!("cannot read stdin: {e}");
                break;
            }
        };
        let answer = answer(&mut vm, &mut agent, &line, opts.request_timeout);
        writeln!(output, "{answer}").map_err(SingleVmError::Stdout)?;
        output.flush().map_err(SingleVmError::Stdout)?;
        if opts.dump_ws && ws_written.is_none() && matches!(agent, Agent::Serving(_)) {
            ws_written = Some(if is_error(&answer) {
                // The pages of an error path are not the function's
                // working set: better none than a wrong one.
                log::error!("--dump_ws: the first request was answered with an error; no working set is written");
                false
            } else {
                finish_working_set(&vm)
            });
        }
    }
    if opts.dump_ws && ws_written != Some(true) {
        log::error!("--dump_ws: no working set was written (it needs one served request)");
    }
    log_phases(&vm);
    let ws_failed = opts.dump_ws && ws_written != Some(true);
    Ok(match agent {
        Agent::Serving(_) if ws_failed => {
            vm.shutdown();
            1
        }
        Agent::Serving(_) => match vm.shutdown() {
            Some(s) if s.success() => 0,
            Some(s) => {
                log::warn!("firerunner ended with {s} at shutdown");
                0
            }
            None => 0,
        },
        Agent::Gone(_) => 1,
    })
}

/// One output line for one input line.
fn answer(vm: &mut VmProcess, agent: &mut Agent, line: &[u8], timeout: Option<Duration>) -> String {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.len() > MAX_FRAME {
        return error_line(format!(
            "request too large: {} bytes (limit {MAX_FRAME})",
            line.len()
        ));
    }
    let request: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => return error_line(format!("invalid request: {e}")),
    };
    let stream = match agent {
        Agent::Serving(s) => s,
        Agent::Gone(why) => return error_line(format!("vm is gone: {why}")),
    };
    let started = Instant::now();
    let deadline = timeout.map(|t| started + t);
    match vm.call(stream, request.to_string().as_bytes(), deadline) {
        Ok(body) => {
            log::info!("request returned in: {} us", started.elapsed().as_micros());
            // One line on stdout: the response as compact JSON.
            serde_json::from_slice::<Value>(&body).map_or_else(
                |e| error_line(format!("invalid response: {e}")),
                |v| v.to_string(),
            )
        }
        Err(CallError::Timeout) => {
            let ms = timeout.map_or(0, |t| t.as_millis());
            vm.kill();
            let why = format!("a request timed out after {ms} ms and the VM was stopped");
            *agent = Agent::Gone(why);
            error_line(format!(
                "timeout: no response within {ms} ms; the VM was stopped"
            ))
        }
        Err(CallError::BadJson(e)) => {
            error_line(format!("the function answered invalid JSON: {e}"))
        }
        Err(CallError::TooLarge(e)) => error_line(format!("request too large: {e}")),
        Err(CallError::Broken(why)) => {
            let why = match vm.try_status() {
                Some(_) => format!("{why}{}", vm.console_tail(5)),
                None => {
                    vm.kill();
                    format!("{why}; the VM was stopped")
                }
            };
            *agent = Agent::Gone(why.clone());
            error_line(format!("vm died: {why}"))
        }
    }
}
