//! testguest reads our read-only virtio-blk disks: the right bytes at the
//! start, middle and end, both disks' sizes, an empty vdb without
//! `--appfs`, and writes refused without touching the file.

mod common;

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::{fnv1a, run_testguest, Scratch};

/// Sector `n` of `path` as the device serves it: zero-padded past the end.
fn sector(path: &Path, n: u64) -> [u8; 512] {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut buf = [0u8; 512];
    let mut done = 0;
    while done < 512 {
        match f.read_at(&mut buf[done..], n * 512 + done as u64).unwrap() {
            0 => break,
            k => done += k,
        }
    }
    buf
}

/// Deterministic, position-dependent content, so a read from the wrong
/// offset cannot match.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 7) as u8)
        .collect()
}

/// Boots with diskcheck and returns each disk's lines, keyed by disk name.
fn diskcheck(rootfs: &Path, appfs: Option<&Path>) -> HashMap<String, Vec<String>> {
    let mut args = vec![
        "--rootfs".to_string(),
        rootfs.display().to_string(),
        "--kernel_args".into(),
        "testguest.diskcheck=1 testguest.exit=reboot".into(),
    ];
    if let Some(a) = appfs {
        args.push("--appfs".into());
        args.push(a.display().to_string());
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_testguest(&refs);
    assert_eq!(out.code(), Some(0), "{}\n{}", out.stdout, out.stderr);
    let mut disks: HashMap<String, Vec<String>> = HashMap::new();
    for line in out.guest_lines() {
        assert!(
            !line.starts_with("exception") && !line.starts_with("panic"),
            "{line}"
        );
        if let Some((name, rest)) = line.split_once(": ") {
            if name.starts_with("vd") {
                disks
                    .entry(name.to_string())
                    .or_default()
                    .push(rest.to_string());
            } else if name == "manifest" || name == "appfs" {
                disks
                    .entry("vdb".into())
                    .or_default()
                    .push(line.to_string());
            }
        }
    }
    disks
}

/// Checks what the guest reported for one disk against the file.
fn check_disk(lines: &[String], path: &Path) {
    let size = std::fs::metadata(path).unwrap().len();
    let sectors = size.div_ceil(512);
    let head = &lines[0];
    assert!(
        head.starts_with(&format!("sectors {sectors} ro 1 id ")),
        "{head}"
    );
    let fnv = lines
        .iter()
        .find(|l| l.starts_with("fnv "))
        .unwrap_or_else(|| panic!("no fnv line: {lines:?}"));
    let expect = format!(
        "fnv first {:016x} middle {:016x} last {:016x}",
        fnv1a(&sector(path, 0)),
        fnv1a(&sector(path, sectors / 2)),
        fnv1a(&sector(path, sectors - 1))
    );
    assert_eq!(fnv, &expect);
    assert!(lines.contains(&"write status 1".to_string()), "{lines:?}");
}

#[test]
fn guest_reads_the_right_bytes_from_both_disks() {
    let s = Scratch::new("blk");
    let rootfs = s.file("rootfs.img", &pattern(3 << 20));
    let appfs = s.file("app.img", &{
        let mut m = b"fn=hello\nmib=4\n".to_vec();
        m.resize(4096, 0);
        m
    });
    let disks = diskcheck(&rootfs, Some(&appfs));
    check_disk(&disks["vda"], &rootfs);
    check_disk(&disks["vdb"], &appfs);
    let vdb = &disks["vdb"];
    assert!(vdb.contains(&"manifest: fn=hello".to_string()), "{vdb:?}");
    assert!(vdb.contains(&"manifest: mib=4".to_string()), "{vdb:?}");
}

#[test]
fn vdb_is_an_empty_disk_without_appfs() {
    let s = Scratch::new("blk-noapp");
    let rootfs = s.file("rootfs.img", &pattern(4096));
    let disks = diskcheck(&rootfs, None);
    let vdb = &disks["vdb"];
    assert!(vdb[0].starts_with("sectors 0 ro 1"), "{vdb:?}");
    assert!(vdb.iter().all(|l| !l.starts_with("fnv")), "{vdb:?}");
    assert!(vdb.contains(&"appfs: empty".to_string()), "{vdb:?}");
}

#[test]
fn odd_sized_and_large_disks() {
    let s = Scratch::new("blk-sizes");
    // 1000 bytes: two sectors, the second half zero padding.
    let small = s.file("small.img", &pattern(1000));
    let disks = diskcheck(&small, None);
    check_disk(&disks["vda"], &small);

    // 1 GiB, sparse, with data at the start, middle and end.
    let big = s.path("big.img");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&big).unwrap();
        f.set_len(1 << 30).unwrap();
        let p = pattern(512);
        for off in [0u64, 1 << 29, (1 << 30) - 512] {
            f.write_all_at(&p, off).unwrap();
        }
    }
    let disks = diskcheck(&big, None);
    check_disk(&disks["vda"], &big);
}

#[test]
fn writes_fail_and_leave_the_file_untouched() {
    let s = Scratch::new("blk-ro");
    let rootfs = s.file("rootfs.img", &pattern(8192));
    let before = std::fs::metadata(&rootfs).unwrap();
    let content = std::fs::read(&rootfs).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let disks = diskcheck(&rootfs, None);
    assert!(disks["vda"].contains(&"write status 1".to_string()));
    let after = std::fs::metadata(&rootfs).unwrap();
    assert_eq!(
        (before.mtime(), before.mtime_nsec()),
        (after.mtime(), after.mtime_nsec())
    );
    assert_eq!(std::fs::read(&rootfs).unwrap(), content);
}
