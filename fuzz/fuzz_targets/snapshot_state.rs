//! Snapshot-state parsing and restore. The first input byte picks what the
//! rest is (`% 5`):
//! - 0: a whole `snapshot.json`, decoded by `MicrovmState::decode`
//!   (format, version, checksum, then the state);
//! - 1: the `state` value alone, sealed with a correct checksum first, so
//!   mutations reach the state parser instead of failing the checksum;
//! - 2: one device's `TransportState` (the virtio-mmio part of the state);
//! - 3: the state value of a layer a hibernated VM wrote, sealed, in a
//!   layer directory with 64 KiB of memory, as multivm adopts it
//!   (`chain::identify`) and merges it (`chain::merge`): an error or a
//!   result, never a panic;
//! - 4: a layer stream as multivm's `PUT /system/hibernated/NAME` reads
//!   it from another node (`chain::receive`, into 1 MiB of RAM): refused
//!   with nothing left behind, or a layer whose identity can be taken.
//!
//! Every device state that parses is restored into a fresh transport over
//! fresh guest memory: restore must either refuse it with an error or
//! give a transport that survives queue notifications, register reads,
//! and a second save and restore.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use snapvm::snapshot::chain;
use snapvm::snapshot::format::{seal_value, FORMAT, MEMORY_FILE, STATE_FILE, VERSION};
use snapvm::snapshot::hash::xxh64;
use snapvm::vmm::devices::virtio::mmio::{regs, TransportState};
use snapvm::vmm::devices::virtio::TYPE_VSOCK;
use snapvm::vmm::persist::MicrovmState;
use snapvm_fuzz::{deliver_notifications, empty_memory, read_reg, transport, Kind};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 5 {
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
        2 => {
            if let Ok(state) = serde_json::from_slice::<TransportState>(rest) {
                restore(&state);
            }
        }
        3 => hibernated_layer(rest),
        _ => received_layer(rest),
    }
});

fn received_layer(mut stream: &[u8]) {
    let dir = std::env::temp_dir().join(format!("snapvm-fuzz-receive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch directory");
    let target = dir.join("layer");
    match chain::receive(&mut stream, &target, 1 << 20) {
        Ok(got) => {
            if let Err(e) = chain::identify(&got) {
                panic!("a received layer cannot be identified: {e}");
            }
        }
        Err(_) => assert!(!target.exists(), "a refused layer was left behind"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn hibernated_layer(state: &[u8]) {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(state) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("snapvm-fuzz-chain-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let layer = dir.join("layer");
    std::fs::create_dir_all(&layer).expect("scratch directory");
    let sealed = seal_value(VERSION, &value).expect("a JSON value seals");
    std::fs::write(layer.join(STATE_FILE), sealed).expect("state file");
    std::fs::write(layer.join(MEMORY_FILE), vec![0x5a; 64 << 10]).expect("memory file");
    let _ = chain::identify(&layer);
    let _ = chain::merge(std::slice::from_ref(&layer), &dir.join("merged"));
    let _ = std::fs::remove_dir_all(&dir);
}

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
