//! Snapshot-state parsing and restore. The first input byte picks what the
//! rest is (`% 3`):
//! - 0: a whole `snapshot.json`, decoded by `MicrovmState::decode`
//!   (format, version, checksum, then the state);
//! - 1: the `state` value alone, sealed with a correct checksum first, so
//!   mutations reach the state parser instead of failing the checksum;
//! - 2: one device's `TransportState` (the virtio-mmio part of the state).
//!
//! Every device state that parses is restored into a fresh transport over
//! fresh guest memory: restore must either refuse it with an error or
//! give a transport that survives queue notifications, register reads,
//! and a second save and restore.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use snapvm::snapshot::format::{FORMAT, VERSION};
use snapvm::snapshot::hash::xxh64;
use snapvm::vmm::devices::virtio::mmio::{regs, TransportState};
use snapvm::vmm::devices::virtio::TYPE_VSOCK;
use snapvm::vmm::persist::MicrovmState;
use snapvm_fuzz::{deliver_notifications, empty_memory, read_reg, transport, Kind};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => whole_file(rest),
        1 => {
            let mut file = format!(
                "{{\"format\":\"{FORMAT}\",\"version\":{VERSION},\"checksum\":\"{:016x}\",\"state\":",
                xxh64(rest)
            )
            .into_bytes();
            file.extend_from_slice(rest);
            file.extend_from_slice(b"}\n");
            whole_file(&file);
        }
        _ => {
            if let Ok(state) = serde_json::from_slice::<TransportState>(rest) {
                restore(&state);
            }
        }
    }
});

fn whole_file(bytes: &[u8]) {
    let Ok(state) = MicrovmState::decode(Path::new("snapshot.json"), bytes) else {
        return;
    };
    for device in &state.devices {
        restore(&device.transport);
    }
}

fn restore(state: &TransportState) {
    let mem = empty_memory();
    let kind = if state.device_type == TYPE_VSOCK {
        Kind::Vsock
    } else {
        Kind::Block
    };
    let mut t = transport(&mem, kind, 0);
    if t.restore_state(state).is_err() {
        return;
    }
    deliver_notifications(&t);
    let mut off = 0;
    while off < regs::CONFIG + 0x20 {
        read_reg(&mut t, off);
        off += 4;
    }
    let again = t.save_state();
    let mut t2 = transport(&mem, kind, 1);
    if let Err(e) = t2.restore_state(&again) {
        panic!("a state saved from a restored transport does not restore: {e}\n{again:?}");
    }
    deliver_notifications(&t2);
}
