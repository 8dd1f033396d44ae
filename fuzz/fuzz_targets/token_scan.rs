//! The kernel's streaming token scan (`tracer_common::scan`, the very code the eBPF program
//! runs), over any bytes a server could read: it never panics (overflow checks are on), and
//! where the reads are cut changes nothing: the same token hashes, in order, with the same
//! cross-tenant verdicts, and the same bound events.
//! Input: two bytes of cut position, then the stream (its first 4 KiB).
#![no_main]
use libfuzzer_sys::fuzz_target;
use tracer_common::{
    scan::{
        names_other_tenant, scan_all, ConnScan, Pattern, ScanTables, PK_ROUTE, PK_TENANT_PATH,
        PK_TENANT_QUERY, PK_TOKEN,
    },
    tenant_hash,
};

const SEED: u64 = 0x5eed;

fn tables() -> ScanTables {
    let p = |bytes: &'static [u8], any_case: bool, kind: u8| Pattern {
        bytes,
        any_case,
        kind,
    };
    ScanTables::build(&[
        p(b"skolsid=", false, PK_TOKEN),
        p(b"bearer", true, PK_TOKEN),
        p(b"\nx-session:", true, PK_TOKEN),
        p(b"username=", false, PK_TOKEN),
        p(b"\"username\":\"", false, PK_TOKEN),
        p(b"/api/addressbook/persons", false, PK_ROUTE),
        p(b"schoolId=", false, PK_TENANT_QUERY),
        p(b"/api/addressbook/schools/", false, PK_TENANT_PATH),
    ])
    .expect("the demo's patterns fit")
}

fn run(t: &ScanTables, parts: &[&[u8]]) -> (Vec<(u64, bool)>, u32) {
    let own = tenant_hash(SEED, b"sch-01");
    let mut s = ConnScan::new(1);
    let mut out = Vec::new();
    let mut evs = 0;
    for p in parts {
        evs |= scan_all(&mut s, t, SEED, p, |h, cs| {
            out.push((h, names_other_tenant(cs, own)))
        });
    }
    (out, evs)
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    // 4 KiB covers several requests; heads up to the 1 MiB bound are the unit tests' part.
    let stream = &data[2..data.len().min(2 + 4096)];
    let cut = u16::from_le_bytes([data[0], data[1]]) as usize % (stream.len() + 1);
    let t = tables();
    let whole = run(&t, &[stream]);
    let two = run(&t, &[&stream[..cut], &stream[cut..]]);
    assert_eq!(whole, two, "cut at {cut}");
    // Cut into reads of 1 to 8 bytes (the kernel's scan is resumed at every cut).
    let step = 1 + (data[0] as usize % 8);
    let small: Vec<&[u8]> = stream.chunks(step).collect();
    assert_eq!(whole, run(&t, &small), "reads of {step} bytes");
});
