//! A guest that attacks its VMM. husk-vmm boots it instead of a kernel
//! (long mode, first GiB identity-mapped, rsi = the zero page); it finds
//! the virtio-mmio devices and runs one attack, chosen on the command line
//! (`husk.attack=NAME`), in rounds until it is stopped: the host measures
//! the VMM meanwhile (bench/hostile, tests/tests/hostile_guest.rs).
//!
//! Everything a guest kernel could do to a device is fair: descriptor
//! loops, chains longer than the queue, addresses outside memory, 4 GiB
//! lengths, wrong directions, kicks of queues that are not ready, floods of
//! vsock connections with no RX buffers, half-closed connections held open,
//! and garbage written to every register. It logs on the serial port
//! (`hostile: NAME round N` now and then) and never stops by itself.

#![no_std]
#![no_main]

mod mem;
mod virtio;

use core::arch::{asm, global_asm};

use virtio::{Device, Queue, F_NEXT, F_WRITE};

// Entry: our own stack, SSE on (the compiler may use it), then main with
// the zero page's address.
global_asm!(
    ".section .text._start, \"ax\"",
    ".global _start",
    "_start:",
    "cli",
    "lea rsp, [rip + {stack} + {stack_size}]",
    "mov rax, cr0",
    "and rax, ~0x4",
    "or rax, 0x2",
    "mov cr0, rax",
    "mov rax, cr4",
    "or rax, 0x600",
    "mov cr4, rax",
    "mov rdi, rsi",
    "call {main}",
    "2: hlt",
    "jmp 2b",
    stack = sym STACK,
    stack_size = const STACK_SIZE,
    main = sym hostile_main,
);

const STACK_SIZE: usize = 64 * 1024;
#[repr(align(16))]
struct Stack(#[allow(dead_code)] [u8; STACK_SIZE]);
static mut STACK: Stack = Stack([0; STACK_SIZE]);

/// A page directory mapping 3-4 GiB, where the MMIO devices are.
#[repr(align(4096))]
struct PageDir([u64; 512]);
static mut MMIO_PD: PageDir = PageDir([0; 512]);
/// The VMM's page tables (vmm/src/arch/layout.rs).
const PDPTE_START: usize = 0xa000;

const MMIO_BASE: usize = 0xd000_0000;
const VIRTIO_MAGIC: u32 = 0x7472_6976;
const TYPE_BLOCK: u32 = 2;
const TYPE_RNG: u32 = 4;
const TYPE_VSOCK: u32 = 19;

/// Rings and buffers, in guest RAM (the VMs have at least 64 MiB).
const RINGS: usize = 0x100_0000;
const BUFS: usize = 0x200_0000;

pub fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the serial port or the i8042 of our own VM.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) }
}

pub fn log(s: &str) {
    for b in s.bytes() {
        outb(0x3f8, b);
    }
}

pub fn log_num(mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    for &d in &digits[i..] {
        outb(0x3f8, d);
    }
}

/// Resets the VM through the i8042 (husk-vmm exits).
fn reboot() -> ! {
    outb(0x64, 0xfe);
    loop {
        // SAFETY: halting the vCPU.
        unsafe { asm!("hlt") }
    }
}

/// libcore for this target was built to unwind and names this symbol;
/// with panic=abort nothing ever calls it.
#[no_mangle]
extern "C" fn rust_eh_personality() {}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    log("hostile: panic\n");
    reboot()
}

/// Maps 3-4 GiB with 2 MiB pages (uncached) so the MMIO window is reachable.
fn map_mmio() {
    // SAFETY: one CPU, before anything else runs: the page directory is
    // ours, the PDPT is the VMM's, identity-mapped, and entry 3 is unused.
    unsafe {
        let pd = &raw mut MMIO_PD;
        for i in 0..512 {
            (*pd).0[i] = (0xc000_0000 + (i as u64) * (2 << 20)) | 0x9b; // P RW PWT PCD PS
        }
        mem::w64(PDPTE_START + 3 * 8, (pd as u64) | 0x3);
        asm!("mov rax, cr3", "mov cr3, rax", out("rax") _);
    }
}

/// The command line's `husk.attack=` value.
fn attack_name(zero_page: usize) -> &'static [u8] {
    let ptr = mem::r32(zero_page + 0x228) as usize;
    if ptr == 0 {
        return b"";
    }
    // SAFETY: the VMM wrote a NUL-terminated command line there, in the
    // identity-mapped first GiB; we stop at 4 KiB whatever it holds.
    let line = unsafe { core::slice::from_raw_parts(ptr as *const u8, 4096) };
    let len = line.iter().position(|&b| b == 0).unwrap_or(line.len());
    let line = &line[..len];
    let key = b"husk.attack=";
    for start in 0..line.len() {
        if line[start..].starts_with(key) {
            let rest = &line[start + key.len()..];
            let end = rest.iter().position(|&b| b == b' ').unwrap_or(rest.len());
            return &rest[..end];
        }
    }
    b""
}

/// Writes every page of RAM above 16 MiB (the boot map's usable ranges),
/// so the VMM's RSS holds all of guest memory before any attack: what it
/// grows by afterwards is the VMM's own.
fn touch_ram(zero_page: usize) {
    let entries = usize::from(mem::r8(zero_page + 0x1e8)).min(128);
    for i in 0..entries {
        let e = zero_page + 0x2d0 + i * 20;
        let (addr, size, kind) = (
            mem::r64(e) as usize,
            mem::r64(e + 8) as usize,
            mem::r32(e + 16),
        );
        if kind != 1 {
            continue;
        }
        let end = addr.saturating_add(size).min(1 << 30);
        let mut page = addr.max(RINGS);
        while page < end {
            mem::w32(page, 0);
            page += 4096;
        }
    }
}

fn find(dev_type: u32) -> Option<Device> {
    (0..32)
        .map(|i| MMIO_BASE + i * 0x1000)
        .take_while(|&b| mem::r32(b) == VIRTIO_MAGIC)
        .find(|&b| mem::r32(b + 8) == dev_type)
        .map(Device::new)
}

type Attack = fn(&mut State, u64);

/// What an attack keeps between rounds.
struct State {
    q: [Option<Queue>; 3],
    rng: u64,
}

impl State {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }
}

const ATTACKS: &[(&str, Attack)] = &[
    ("blk-loop", blk_loop),
    ("blk-long-chain", blk_long_chain),
    ("blk-outside-memory", blk_outside),
    ("blk-4gib", blk_4gib),
    ("blk-wrong-direction", blk_wrong_direction),
    ("kick-unready", kick_unready),
    ("vsock-flood", vsock_flood),
    ("vsock-half-closed", vsock_half_closed),
    ("rng-4gib", rng_4gib),
    ("mmio-garbage", mmio_garbage),
];

#[no_mangle]
extern "C" fn hostile_main(zero_page: usize) -> ! {
    map_mmio();
    let name = attack_name(zero_page);
    let Some(&(label, attack)) = ATTACKS.iter().find(|(n, _)| n.as_bytes() == name) else {
        log("hostile: unknown attack; known:");
        for (n, _) in ATTACKS {
            log(" ");
            log(n);
        }
        log("\n");
        reboot()
    };
    touch_ram(zero_page);
    let mut st = State {
        q: [None, None, None],
        rng: 0x9e37_79b9_7f4a_7c15,
    };
    log("hostile: attack ");
    log(label);
    log(" started\n");
    let mut round = 0u64;
    loop {
        attack(&mut st, round);
        if round % 1000 == 0 {
            log("hostile: ");
            log(label);
            log(" round ");
            log_num(round);
            log("\n");
        }
        round += 1;
    }
}

/// The device of `dev_type`, or the guest ends saying it has none.
fn need(dev_type: u32, name: &str) -> Device {
    let Some(d) = find(dev_type) else {
        log("hostile: no ");
        log(name);
        log(" device\n");
        reboot()
    };
    d
}

/// A device with one queue of `size`, set up on first use.
fn one_queue<'a>(st: &'a mut State, dev_type: u32, name: &str, size: u16) -> &'a mut Queue {
    if st.q[0].is_none() {
        let d = need(dev_type, name);
        d.init();
        st.q[0] = Some(d.queue(0, size, RINGS));
        d.driver_ok();
    }
    st.q[0].as_mut().expect("set up above")
}

/// The block device, set up once, with its queue.
fn blk(st: &mut State) -> &mut Queue {
    one_queue(st, TYPE_BLOCK, "block", 256)
}

/// A block request header at `at`.
fn blk_header(at: usize, t: u32, sector: u64) {
    mem::w32(at, t);
    mem::w32(at + 4, 0);
    mem::w64(at + 8, sector);
}

fn blk_loop(st: &mut State, _: u64) {
    let q = blk(st);
    blk_header(BUFS, 0, 0);
    q.desc(0, BUFS as u64, 16, F_NEXT, 0);
    q.post(0);
}

fn blk_long_chain(st: &mut State, _: u64) {
    let q = blk(st);
    blk_header(BUFS, 0, 0);
    let n = q.size;
    for i in 0..n {
        q.desc(i, BUFS as u64, 16, F_NEXT, (i + 1) % n);
    }
    q.post(0);
}

fn blk_outside(st: &mut State, round: u64) {
    let q = blk(st);
    blk_header(BUFS, 0, 0);
    let (h, d, s) = match round % 3 {
        0 => (0xffff_ffff_ffff_f000, BUFS as u64 + 512, BUFS as u64 + 4096),
        1 => (BUFS as u64, 0x10_0000_0000, BUFS as u64 + 4096),
        _ => (BUFS as u64, BUFS as u64 + 512, 0xffff_0000_0000),
    };
    q.desc(0, h, 16, F_NEXT, 1);
    q.desc(1, d, 512, F_NEXT | F_WRITE, 2);
    q.desc(2, s, 1, F_WRITE, 0);
    q.post(0);
}

fn blk_4gib(st: &mut State, round: u64) {
    let q = blk(st);
    let (t, flags) = if round % 2 == 0 {
        (0, F_NEXT | F_WRITE)
    } else {
        (1, F_NEXT)
    };
    blk_header(BUFS, t, 0);
    q.desc(0, BUFS as u64, 16, F_NEXT, 1);
    q.desc(1, BUFS as u64 + 4096, 0xffff_fe00, flags, 2);
    q.desc(2, BUFS as u64 + 512, 1, F_WRITE, 0);
    q.post(0);
}

fn blk_wrong_direction(st: &mut State, round: u64) {
    let q = blk(st);
    let t = (round % 2) as u32;
    blk_header(BUFS, t, 1);
    // A read into a read-only buffer, a write from a writable one, and a
    // status byte the device may not write.
    let data = if t == 0 { F_NEXT } else { F_NEXT | F_WRITE };
    let status = if round % 4 < 2 { 0 } else { F_WRITE };
    q.desc(0, BUFS as u64, 16, F_NEXT | F_WRITE, 1);
    q.desc(1, BUFS as u64 + 4096, 4096, data, 2);
    q.desc(2, BUFS as u64 + 512, 1, status, 0);
    q.post(0);
}

fn kick_unready(st: &mut State, round: u64) {
    let devs = [TYPE_BLOCK, TYPE_VSOCK, TYPE_RNG];
    let Some(d) = find(devs[(round % 3) as usize]) else {
        return;
    };
    // Kicks with the device reset, half set up, and with queues that do
    // not exist; an avail index far ahead of what was posted; a queue
    // whose rings lie outside memory made ready anyway.
    d.reset();
    for i in [0, 1, 2, 7, 0xffff] {
        d.notify(i);
    }
    d.init();
    let mut q = d.queue(0, 256, RINGS + 0x10_0000);
    q.set_avail_idx((st.next() & 0xffff) as u16);
    d.notify(0);
    d.select_queue(1);
    d.set_queue_addrs(0xffff_ffff_f000, 0xffff_ffff_e000, 0xffff_ffff_d000);
    mem::w32(d.base + 0x44, 1);
    d.driver_ok();
    for i in 0..4 {
        d.notify(i);
    }
}

/// The vsock device with RX, TX and event queues; RX buffers only if asked.
fn vsock(st: &mut State, rx_buffers: bool) {
    if st.q[1].is_some() {
        return;
    }
    let d = need(TYPE_VSOCK, "vsock");
    d.init();
    let mut rx = d.queue(0, 256, RINGS);
    let tx = d.queue(1, 256, RINGS + 0x4000);
    let evt = d.queue(2, 16, RINGS + 0x8000);
    if rx_buffers {
        for i in 0..256u16 {
            rx.desc(
                i,
                (BUFS + 0x180_0000 + usize::from(i) * 4096) as u64,
                4096,
                F_WRITE,
                0,
            );
            rx.post_quiet(i);
        }
    }
    d.driver_ok();
    st.q = [Some(rx), Some(tx), Some(evt)];
}

/// A vsock packet header at `at` from our port `src` to host port `dst`.
fn vsock_packet(at: usize, src: u32, dst: u32, op: u16, len: u32, flags: u32) {
    mem::w64(at, 3); // src_cid
    mem::w64(at + 8, 2); // dst_cid
    mem::w32(at + 16, src);
    mem::w32(at + 20, dst);
    mem::w32(at + 24, len);
    mem::w16(at + 28, 1); // stream
    mem::w16(at + 30, op);
    mem::w32(at + 32, flags);
    mem::w32(at + 36, 256 * 1024); // buf_alloc
    mem::w32(at + 40, 0); // fwd_cnt
}

const OP_REQUEST: u16 = 1;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
/// The host end of the hostile VM's vsock listens here and never reads.
const HOST_PORT: u32 = 5000;

/// Sends one TX packet per slot of the ring: `fill(slot, header)` writes it.
fn vsock_burst(st: &mut State, fill: &mut dyn FnMut(u16, usize) -> u32) {
    let tx = st.q[1].as_mut().expect("vsock set up");
    for slot in 0..tx.size {
        let at = BUFS + usize::from(slot) * 0x1_1000;
        let len = fill(slot, at);
        tx.desc(slot, at as u64, 44 + len, 0, 0);
        tx.post_quiet(slot);
    }
    tx.kick();
}

fn vsock_flood(st: &mut State, round: u64) {
    vsock(st, false);
    // New connections from fresh ports, to a host listener and to ports
    // nobody listens on, with data beyond what the host reads, and never
    // an RX buffer for the answers.
    let base = (round as u32).wrapping_mul(256);
    vsock_burst(st, &mut |slot, at| {
        let src = base.wrapping_add(u32::from(slot)) | 0x8000_0000;
        match slot % 4 {
            0 => vsock_packet(at, src, HOST_PORT, OP_REQUEST, 0, 0),
            1 => vsock_packet(at, src, 6000 + u32::from(slot), OP_REQUEST, 0, 0),
            _ => {
                vsock_packet(at, src & !3, HOST_PORT, OP_RW, 65536, 0);
                return 65536;
            }
        }
        0
    });
}

fn vsock_half_closed(st: &mut State, round: u64) {
    vsock(st, true);
    // Connect, say we will send no more, and hold the connection: every
    // slot the VMM has, for as long as it lets us.
    let base = (round as u32).wrapping_mul(128);
    vsock_burst(st, &mut |slot, at| {
        let src = base.wrapping_add(u32::from(slot / 2)) | 0x4000_0000;
        if slot % 2 == 0 {
            vsock_packet(at, src, HOST_PORT, OP_REQUEST, 0, 0);
        } else {
            vsock_packet(at, src, HOST_PORT, OP_SHUTDOWN, 0, 2);
        }
        0
    });
    // Give the RX buffers back so the answers keep coming.
    let rx = st.q[0].as_mut().expect("vsock set up");
    for i in 0..rx.size {
        rx.post_quiet(i);
    }
    rx.kick();
}

fn rng_4gib(st: &mut State, round: u64) {
    let q = one_queue(st, TYPE_RNG, "rng", 64);
    let addr = if round % 2 == 0 {
        BUFS as u64
    } else {
        0xffff_ffff_0000
    };
    q.desc(0, addr, 0xffff_ffff, F_WRITE, 0);
    q.post(0);
}

fn mmio_garbage(st: &mut State, _: u64) {
    for _ in 0..64 {
        let r = st.next();
        let slot = (r % 8) as usize;
        let base = MMIO_BASE + slot * 0x1000;
        if mem::r32(base) != VIRTIO_MAGIC {
            continue;
        }
        let off = ((r >> 8) % 0x200) as usize & !3;
        let v = (r >> 32) as u32;
        if (r >> 20) % 4 == 0 {
            let _ = mem::r32(base + off);
        } else {
            mem::w32(base + off, v);
        }
    }
}
