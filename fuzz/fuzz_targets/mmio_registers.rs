//! The virtio-mmio register state machine, over a block or a vsock device:
//! register reads and writes of every width at any offset of the 4 KiB
//! window, a well-behaved driver's bring-up with queue addresses from the
//! input, guest stores, driver resets and snapshot round trips (save the
//! transport state, serialize it, restore it into a fresh transport and
//! carry on with that one), with queue notifications delivered as the
//! event loop delivers them.
//!
//! Control stream after the memory image: `flags` (bit 0: vsock, else
//! block), then operations (one byte each, `op % 8`, with arguments), see
//! `run`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use snapvm::vmm::bus::{lock, BusDevice};
use snapvm::vmm::devices::virtio::mmio::{
    regs, status, MmioTransport, TransportState, MMIO_MAGIC_VALUE,
};
use snapvm::vmm::devices::virtio::VIRTIO_F_VERSION_1;
use snapvm::vmm::memory::GuestMemoryMmap;
use snapvm_fuzz::{
    bring_up, deliver_notifications, guest_memory, poke, read_reg, transport, write_reg, Input,
    Kind, QueueSetup,
};

const MAX_OPS: usize = 128;

fuzz_target!(|data: &[u8]| run(data));

/// Access widths a vCPU can produce, plus odd ones the bus must survive.
const WIDTHS: [usize; 6] = [1, 2, 4, 8, 3, 0];

fn run(data: &[u8]) {
    let mut input = Input::new(data);
    let mem = guest_memory(&mut input);
    let kind = if input.u8() & 1 == 0 {
        Kind::Block
    } else {
        Kind::Vsock
    };
    let mut slot = 0u8;
    let mut t = transport(&mem, kind, slot);
    for _ in 0..MAX_OPS {
        if input.is_empty() {
            break;
        }
        match input.u8() % 8 {
            0 => {
                let off = u64::from(input.u16() & 0xfff);
                write_reg(&mut t, off, input.u32());
            }
            1 => {
                let off = u64::from(input.u16() & 0xfff);
                read_reg(&mut t, off);
            }
            2 => {
                let off = u64::from(input.u16() & 0xfff);
                let w = WIDTHS[usize::from(input.u8()) % WIDTHS.len()];
                let mut b = [0u8; 8];
                let src = input.bytes(w);
                b[..src.len()].copy_from_slice(src);
                t.write(off, &b[..w]);
            }
            3 => {
                let off = u64::from(input.u16() & 0xfff);
                let w = WIDTHS[usize::from(input.u8()) % WIDTHS.len()];
                let mut b = [0u8; 8];
                t.read(off, &mut b[..w]);
            }
            4 => {
                let n = usize::from(input.u8() % 4);
                let queues: Vec<QueueSetup> = (0..n)
                    .map(|_| QueueSetup {
                        size: input.u16(),
                        desc: u64::from(input.u32()),
                        avail: u64::from(input.u32()),
                        used: u64::from(input.u32()),
                    })
                    .collect();
                bring_up(&mut t, &queues);
            }
            5 => {
                let addr = u64::from(input.u32());
                let len = usize::from(input.u8());
                poke(&mem, addr, input.bytes(len));
            }
            6 => {
                slot ^= 1;
                t = round_trip(&t, &mem, kind, slot);
            }
            _ => {
                write_reg(&mut t, regs::STATUS, 0);
                assert_eq!(t.status(), 0, "status after reset");
                assert_eq!(read_reg(&mut t, regs::INTERRUPT_STATUS), 0);
                assert!(!t.is_activated(), "active after reset");
            }
        }
        deliver_notifications(&t);
        check(&mut t);
    }
}

/// Snapshot and restore: what firerunner writes must read back and restore.
fn round_trip(t: &MmioTransport, mem: &GuestMemoryMmap, kind: Kind, slot: u8) -> MmioTransport {
    let state = t.save_state();
    let json = serde_json::to_vec(&state).expect("cannot serialize a transport state");
    let parsed: TransportState =
        serde_json::from_slice(&json).expect("cannot parse a serialized transport state");
    assert_eq!(parsed, state, "transport state changed through JSON");
    let mut fresh = transport(mem, kind, slot);
    if let Err(e) = fresh.restore_state(&parsed) {
        panic!("restoring a state just saved failed: {e}\n{state:?}");
    }
    assert_eq!(fresh.save_state(), state, "restored state differs");
    fresh
}

/// Invariants of the register state machine.
fn check(t: &mut MmioTransport) {
    assert_eq!(read_reg(t, regs::MAGIC_VALUE), MMIO_MAGIC_VALUE);
    let st = t.status();
    let known = status::ACKNOWLEDGE
        | status::DRIVER
        | status::FEATURES_OK
        | status::DRIVER_OK
        | status::DEVICE_NEEDS_RESET
        | status::FAILED;
    assert_eq!(st & !known, 0, "unknown status bits {st:#x}");
    if t.is_activated() {
        assert_ne!(st & status::DRIVER_OK, 0, "active without DRIVER_OK");
    }
    if st & status::FEATURES_OK != 0 {
        let offered = lock(t.device()).device_features();
        let acked = t.acked_features();
        assert_eq!(acked & !offered, 0, "FEATURES_OK with unoffered features");
        assert_ne!(
            acked & VIRTIO_F_VERSION_1,
            0,
            "FEATURES_OK without VERSION_1"
        );
    }
    if st & status::DRIVER_OK != 0 {
        assert_ne!(st & status::FEATURES_OK, 0, "DRIVER_OK without FEATURES_OK");
    }
}
