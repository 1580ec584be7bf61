//! Moving a VM to another multivm node: the source hibernates an idle VM
//! of a keep_state function (hibernate.rs) and sends its layers to the
//! target's `PUT /system/hibernated/NAME` in one HTTP/1.1 request, with
//! the caller's credentials; the target checks them like any layer
//! (format, checksums, pages inside its RAM), takes them only if they
//! stack on its own snapshot of the function and were taken on a CPU like
//! its own (CPUID, TSC frequency), and keeps them as a hibernated VM that
//! its next request for the function wakes. The function's own layers are
//! never sent: both nodes have them, and the layers name them by state
//! checksum. A move the target refuses leaves the VM hibernated on the
//! source.

use std::io::{BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::hibernate::{HibernateError, Image, Store};

/// How long connecting to the target, and each read or write, may take.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// The most of the target's answer that is kept (for the error message).
const ANSWER_MAX: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("no function named {0:?}")]
    NoSuchFunction(String),
    #[error("only VMs of keep_state functions move (and multivm needs a hibernate section)")]
    NotKept,
    #[error("the function has no idle VM to move")]
    NoIdleVm,
    #[error("the VM could not be hibernated; its state is lost (see the log)")]
    Hibernate,
    #[error(transparent)]
    Layers(#[from] HibernateError),
    #[error("target {0:?}: expected HOST:PORT")]
    BadTarget(String),
    #[error("cannot send the VM to {target}: {source}")]
    Send {
        target: String,
        source: std::io::Error,
    },
    #[error("{target} refused the VM with {status}: {answer}")]
    Refused {
        target: String,
        status: u16,
        answer: String,
    },
}

impl MigrateError {
    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        match self {
            MigrateError::NoSuchFunction(_) => 404,
            MigrateError::NotKept | MigrateError::NoIdleVm => 409,
            MigrateError::BadTarget(_) => 400,
            MigrateError::Layers(HibernateError::Foreign(_)) => 409,
            MigrateError::Layers(
                HibernateError::Chain(_)
                | HibernateError::ChainLength(_)
                | HibernateError::Unexpected { .. },
            ) => 400,
            MigrateError::Layers(_) | MigrateError::Hibernate => 500,
            MigrateError::Send { .. } | MigrateError::Refused { .. } => 502,
        }
    }
}

/// Sends `image` (`bytes` long, [`Store::stream_len`]) to `target`'s
/// `PUT /system/hibernated/NAME` and waits for its 201.
pub fn put_image(
    target: &str,
    name: &str,
    authorization: Option<&str>,
    image: &Image,
    bytes: u64,
) -> Result<(), MigrateError> {
    let addr = target
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| MigrateError::BadTarget(target.into()))?;
    let send = |source| MigrateError::Send {
        target: target.into(),
        source,
    };
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT).map_err(send)?;
    stream.set_read_timeout(Some(IO_TIMEOUT)).map_err(send)?;
    stream.set_write_timeout(Some(IO_TIMEOUT)).map_err(send)?;
    let mut head = format!(
        "PUT /system/hibernated/{name} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\
         Content-Type: application/octet-stream\r\nContent-Length: {bytes}\r\n"
    );
    if let Some(a) = authorization {
        head += &format!("Authorization: {a}\r\n");
    }
    head += "\r\n";
    let mut out = BufWriter::with_capacity(1 << 20, &stream);
    out.write_all(head.as_bytes()).map_err(send)?;
    // A target that refuses early closes the connection: its answer,
    // read below, says why better than the broken pipe.
    let sent = Store::send(image, &mut out)
        .map_err(|e| e.to_string())
        .and_then(|()| out.flush().map_err(|e| e.to_string()));
    drop(out);
    let mut answer = Vec::new();
    let read = (&stream).take(ANSWER_MAX).read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let status = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse::<u16>().ok());
    match (status, sent, read) {
        (Some(201), Ok(()), _) => Ok(()),
        (Some(status), _, _) => Err(MigrateError::Refused {
            target: target.into(),
            status,
            answer: text
                .split_once("\r\n\r\n")
                .map_or("", |(_, body)| body)
                .trim()
                .to_string(),
        }),
        (None, Err(e), _) => Err(send(std::io::Error::other(e))),
        (None, Ok(()), Err(e)) => Err(send(e)),
        (None, Ok(()), Ok(_)) => Err(send(std::io::Error::other("no HTTP answer"))),
    }
}
