//! Reading into the page cache what a program's first exec will load, before
//! a template's snapshot: the program, then what the kernel and the dynamic
//! loader open to run it (a script's `#!` interpreter, an ELF's `PT_INTERP`,
//! its `DT_NEEDED` libraries followed to the end, `/etc/ld.so.cache`). A
//! clone's first exec then maps pages already in memory: in this guest a
//! page read from a drive is emulated virtio and block-layer work.
//!
//! Files are opened through the container's root (pathrs: no link leaves
//! it), and only regular files on the image's kinds of file system (never
//! a FIFO, a device or a /proc or /sys file, which could block or never
//! end). Their data is not copied out: each is mapped read-only with
//! `MAP_POPULATE`, which faults every page in (reading it from the drive
//! into the page cache), copies nothing and has finished when mmap
//! returns, so the snapshot taken next has it all; then it is unmapped. A
//! copy to user space is guest-kernel work too: reading busybox's 1.5 MiB
//! with read() cost ~6.7 s here against ~4 s populated. An ELF file's
//! headers, dynamic section and strings are read where they are (object's
//! ReadCache), nothing else of it.
//!
//! A library is looked for where the loaders look, in part: the object's
//! RPATH (when it has no RUNPATH) or RUNPATH, with `$ORIGIN` expanded (a
//! program's origin is its real path, symlinks followed, as glibc and musl
//! take it), then the usual library directories; the first that exists is
//! taken. Not followed: RPATHs inherited from the objects that loaded this
//! one, directories only /etc/ld.so.cache lists, LD_LIBRARY_PATH, dlopen.
//! A guess that is wrong costs budget, never correctness: this is a hint,
//! and nothing here is trusted afterwards. An image's files are its
//! author's: a file that does not parse is read and not followed, and the
//! bytes, files, names and lookups of one warm are all bounded.

use std::collections::HashSet;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use nix::sys::stat::{fstat, SFlag};
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use object::read::{ReadCache, ReadRef, StringTable};
use object::{elf as E, FileKind};
use pathrs::flags::OpenFlags;
use pathrs::Root;

use crate::executable::find_programs;

/// Most files one warm reads (a program and what it loads: python3 with
/// its libraries is about a dozen).
pub const MAX_FILES: usize = 64;

/// Where a library named without a '/' is looked for after the object's own
/// RPATH/RUNPATH: glibc's system directories on x86_64 (Debian's multiarch
/// first), musl's default path, and /usr/local/lib (ld.so.conf on most
/// distributions, musl's default).
const LIBRARY_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib/x86_64-linux-gnu",
    "/usr/local/lib",
];

/// glibc's loader reads this whole on every dynamic exec.
const LD_CACHE: &str = "/etc/ld.so.cache";

/// The longest `#!` line the kernel reads (BINPRM_BUF_SIZE).
const SHEBANG_MAX: usize = 256;

/// Bounds on what one ELF file may ask for: a larger interpreter name or
/// dynamic segment is not a loader's, more names are not followed.
const INTERP_MAX: u64 = 4096;
const DYNAMIC_MAX: u64 = 64 << 10;
const MAX_LIBRARIES: usize = 128;
const MAX_DIRS: usize = 32;
/// Longest path looked up (PATH_MAX).
const PATH_MAX: usize = 4096;
/// Most path lookups one warm makes (each is guest-kernel work).
const MAX_LOOKUPS: usize = 1024;
/// Symlinks followed to a program's real path (the kernel's limit).
const MAX_LINKS: usize = 40;

/// File systems an image's files are on (the container's overlay, the
/// image's erofs, tmpfs; a host agent's disk): statfs f_type.
const FILE_SYSTEMS: &[i64] = &[
    0x794c_7630, // overlayfs
    0xe0f5_e1e2, // erofs
    0x0102_1994, // tmpfs
    0xef53,      // ext2/3/4
    0x5846_5342, // xfs
    0x9123_683e, // btrfs
];

/// What a warm read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Warmed {
    pub files: usize,
    pub bytes: u64,
}

/// One file's worth of what it asks to be loaded with it.
#[derive(Debug, Default, PartialEq, Eq)]
struct Wants {
    /// Absolute paths (an interpreter, a library named with a '/').
    paths: Vec<PathBuf>,
    /// Library names, with the directories to try first.
    libraries: Vec<String>,
    dirs: Vec<PathBuf>,
    /// A name `#!/usr/bin/env` runs, looked up in $PATH.
    command: Option<String>,
    dynamic: bool,
}

/// Looks `names` up as a launch would (`path` as $PATH, from `cwd`, in
/// `root`: [`find_programs`]) and reads the programs found and what they
/// load ([`warm`]).
pub fn warm_names(root: &Root, names: &[String], path: &str, cwd: &Path, budget: u64) -> Warmed {
    let programs = find_programs(root, names, path, cwd);
    warm(root, &programs, path, budget)
}

/// Reads `programs` (container paths, already looked up) and what they
/// load, in `root`, at most `budget` bytes and [`MAX_FILES`] files in all.
/// `path` is $PATH, for a `#!/usr/bin/env NAME` script's NAME.
pub fn warm(root: &Root, programs: &[PathBuf], path: &str, budget: u64) -> Warmed {
    let mut w = Warmer {
        root,
        path,
        left: budget,
        lookups: 0,
        seen: HashSet::new(),
        done: Warmed::default(),
        cache_read: false,
    };
    // Reversed: the queue is a stack, and the first program is read first.
    let mut queue: Vec<PathBuf> = programs.iter().rev().map(|p| real_path(root, p)).collect();
    // Depth first is fine: every file is read once, whatever the order.
    while let Some(p) = queue.pop() {
        if w.left == 0 || w.done.files >= MAX_FILES {
            break;
        }
        if let Some(wants) = w.read(&p) {
            w.follow(&p, wants, &mut queue);
        }
    }
    w.done
}

struct Warmer<'a> {
    root: &'a Root,
    path: &'a str,
    left: u64,
    lookups: usize,
    /// (device, inode) of each file read: links to one file count once.
    seen: HashSet<(u64, u64)>,
    done: Warmed,
    cache_read: bool,
}

impl Warmer<'_> {
    /// Reads `p` whole (within the budget) into the page cache and says
    /// what it loads; None when it is not there, not a regular file or
    /// already read.
    fn read(&mut self, p: &Path) -> Option<Wants> {
        let handle = self.lookup(p)?;
        let st = fstat(handle.as_fd().as_raw_fd()).ok()?;
        if SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) != SFlag::S_IFREG
            || !on_image_fs(&handle)
        {
            return None;
        }
        if !self.seen.insert((st.st_dev, st.st_ino)) {
            return None;
        }
        let file = handle
            .reopen(OpenFlags::O_RDONLY | OpenFlags::O_NONBLOCK)
            .ok()?;
        let len = u64::try_from(st.st_size).unwrap_or(0).min(self.left);
        populate(&file, len);
        self.left -= len;
        self.done.files += 1;
        self.done.bytes += len;
        Some(wants(&file))
    }

    fn follow(&mut self, p: &Path, wants: Wants, queue: &mut Vec<PathBuf>) {
        if wants.dynamic && !self.cache_read {
            self.cache_read = true;
            queue.push(LD_CACHE.into());
        }
        queue.extend(wants.paths);
        if let Some(name) = wants.command {
            // As a launch looks a program up in $PATH (env does the same).
            let found = find_programs(self.root, &[name], self.path, Path::new("/"));
            queue.extend(found);
        }
        let origin = p.parent().unwrap_or(Path::new("/"));
        let dirs: Vec<PathBuf> = wants
            .dirs
            .iter()
            .map(|d| expand_origin(d, origin))
            .chain(LIBRARY_DIRS.iter().map(PathBuf::from))
            .collect();
        for lib in wants.libraries {
            if let Some(found) = dirs.iter().map(|d| d.join(&lib)).find(|c| self.exists(c)) {
                queue.push(found);
            }
        }
    }

    fn exists(&mut self, p: &Path) -> bool {
        self.lookup(p).is_some()
    }

    /// `p` resolved in the root, while the warm's lookups last.
    fn lookup(&mut self, p: &Path) -> Option<pathrs::Handle> {
        if self.lookups >= MAX_LOOKUPS || p.as_os_str().len() > PATH_MAX {
            return None;
        }
        self.lookups += 1;
        self.root.resolve(p).ok()
    }
}

/// `p` with its last component's symlinks followed inside `root`: where a
/// program's `$ORIGIN` is (both loaders take the real path of the
/// program, /proc/self/exe).
fn real_path(root: &Root, p: &Path) -> PathBuf {
    let mut p = p.to_path_buf();
    for _ in 0..MAX_LINKS {
        let Ok(target) = root.readlink(&p) else {
            break;
        };
        // An absolute target replaces the path; a relative one is from
        // the link's directory.
        p = p.parent().unwrap_or(Path::new("/")).join(target);
    }
    p
}

/// Whether an open file is on one of [`FILE_SYSTEMS`].
fn on_image_fs(handle: &pathrs::Handle) -> bool {
    nix::sys::statfs::fstatfs(handle.as_fd())
        .is_ok_and(|s| FILE_SYSTEMS.contains(&s.filesystem_type().0))
}

/// `$ORIGIN` and `${ORIGIN}` in an RPATH/RUNPATH entry: the directory of
/// the object that names it.
fn expand_origin(dir: &Path, origin: &Path) -> PathBuf {
    let o = origin.to_string_lossy();
    let d = dir.to_string_lossy();
    PathBuf::from(d.replace("${ORIGIN}", &o).replace("$ORIGIN", &o))
}

/// What a file asks to be loaded with it.
fn wants(file: &File) -> Wants {
    let mut head = [0u8; SHEBANG_MAX];
    let n = read_at(file, &mut head, 0);
    let head = &head[..n];
    if let Some(line) = head.strip_prefix(b"#!") {
        return shebang(line);
    }
    if head.starts_with(b"\x7fELF") {
        let Ok(f) = file.try_clone() else {
            return Wants::default();
        };
        // An image's file: object refuses what does not parse; a panic in
        // it must not fail the request this hint serves. The cache is
        // dropped with the closure: nothing of it is seen after a panic.
        let parse = std::panic::AssertUnwindSafe(move || elf(&ReadCache::new(f)));
        return std::panic::catch_unwind(parse).unwrap_or_default();
    }
    Wants::default()
}

fn read_at(file: &File, buf: &mut [u8], offset: u64) -> usize {
    use std::os::unix::fs::FileExt;
    file.read_at(buf, offset).unwrap_or(0)
}

/// Reads `file`'s first `len` bytes into the page cache: a read-only
/// mapping populated by the kernel (every page faulted in, nothing copied)
/// and unmapped. The mapping is never read by this process, so a file cut
/// short meanwhile cannot fault it (PID 1): populating stops at the end.
fn populate(file: &File, len: u64) {
    let Ok(size) = usize::try_from(len) else {
        return;
    };
    if size == 0 {
        return;
    }
    // SAFETY: no MAP_FIXED, so nothing mapped is replaced: the kernel
    // picks a free address. The pointer is never dereferenced (a page past
    // a file cut short would fault), only unmapped below.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_SHARED | libc::MAP_POPULATE,
            file.as_raw_fd(),
            0,
        )
    };
    if at != libc::MAP_FAILED {
        // SAFETY: the mapping made above, unmapped once.
        unsafe { libc::munmap(at, size) };
    }
}

/// `#!INTERP [ARG]`: INTERP, and when INTERP is `env`, the command ARG
/// names (the usual `#!/usr/bin/env python3`). A relative INTERP (the
/// kernel takes it from the cwd of whoever execs) is not followed.
fn shebang(rest: &[u8]) -> Wants {
    let line = &rest[..rest.len().min(SHEBANG_MAX - 2)];
    let line = line.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split([' ', '\t']).filter(|w| !w.is_empty());
    let mut w = Wants::default();
    let Some(interp) = words.next().filter(|i| i.starts_with('/')) else {
        return w;
    };
    if Path::new(interp).file_name().is_some_and(|n| n == "env") {
        w.command = words
            .next()
            .filter(|a| !a.starts_with('-') && !a.contains('/') && !a.contains('='))
            .map(String::from);
    }
    w.paths.push(interp.into());
    w
}

fn elf<'a, R: ReadRef<'a>>(data: R) -> Wants {
    match FileKind::parse(data) {
        Ok(FileKind::Elf64) => elf_as::<E::FileHeader64<object::Endianness>, R>(data),
        Ok(FileKind::Elf32) => elf_as::<E::FileHeader32<object::Endianness>, R>(data),
        _ => None,
    }
    .unwrap_or_default()
}

/// An ELF file's loader, DT_NEEDED names and search directories, from its
/// program headers (section headers may be stripped, and need not match).
/// What was found before something did not parse is kept.
fn elf_as<'a, H: FileHeader, R: ReadRef<'a>>(data: R) -> Option<Wants> {
    let h = H::parse(data).ok()?;
    let endian = h.endian().ok()?;
    let phdrs = h.program_headers(endian, data).ok()?;
    let mut w = Wants::default();
    // The kernel uses the first PT_INTERP.
    let interp = phdrs
        .iter()
        .find(|ph| ph.p_type(endian) == E::PT_INTERP)
        .filter(|ph| ph.p_filesz(endian).into() <= INTERP_MAX);
    if let Some(Ok(Some(i))) = interp.map(|ph| ph.interpreter(endian, data)) {
        w.dynamic = true;
        if i.starts_with(b"/") {
            w.paths
                .push(PathBuf::from(String::from_utf8_lossy(i).as_ref()));
        }
    }
    needed(&mut w, phdrs, endian, data);
    Some(w)
}

/// The DT_NEEDED names and RPATH/RUNPATH directories of an ELF file's
/// dynamic segment (the first PT_DYNAMIC, read up to its DT_NULL), into `w`.
fn needed<'a, P: ProgramHeader, R: ReadRef<'a>>(
    w: &mut Wants,
    phdrs: &[P],
    endian: P::Endian,
    data: R,
) -> Option<()> {
    let ph = phdrs.iter().find(|ph| ph.p_type(endian) == E::PT_DYNAMIC)?;
    if ph.p_filesz(endian).into() > DYNAMIC_MAX {
        return None;
    }
    let dynamic = ph.dynamic(endian, data).ok().flatten()?;
    let tag = |d: &<P::Elf as FileHeader>::Dyn| d.tag32(endian);
    let dynamic = || dynamic.iter().take_while(|d| tag(d) != Some(E::DT_NULL));
    let value = |t: u32| -> Option<u64> {
        Some(dynamic().find(|d| tag(d) == Some(t))?.d_val(endian).into())
    };
    let (addr, size) = (value(E::DT_STRTAB)?, value(E::DT_STRSZ)?);
    // The string table's file offset: the loaded segment holding its address.
    let offset = phdrs.iter().find_map(|ph| {
        let (vaddr, filesz) = (ph.p_vaddr(endian).into(), ph.p_filesz(endian).into());
        let inside = ph.p_type(endian) == E::PT_LOAD
            && addr >= vaddr
            && addr.checked_add(size)? <= vaddr.checked_add(filesz)?;
        let offset: u64 = ph.p_offset(endian).into();
        inside.then(|| offset.checked_add(addr - vaddr)).flatten()
    })?;
    let strings = StringTable::new(data, offset, offset.checked_add(size)?);
    let text = |d: &<P::Elf as FileHeader>::Dyn| -> Option<String> {
        let b = strings.get(d.val32(endian)?).ok()?;
        Some(String::from_utf8_lossy(b).into_owned())
    };
    let (mut rpath, mut runpath) = (Vec::new(), Vec::new());
    for d in dynamic() {
        match tag(d) {
            Some(E::DT_NEEDED) => {
                w.dynamic = true;
                if w.libraries.len() + w.paths.len() > MAX_LIBRARIES {
                    continue;
                }
                let Some(lib) = text(d) else { continue };
                if lib.starts_with('/') {
                    w.paths.push(lib.into());
                } else if !lib.is_empty() && !lib.contains('/') && !w.libraries.contains(&lib) {
                    w.libraries.push(lib);
                }
            }
            Some(E::DT_RPATH) => rpath.extend(text(d)),
            Some(E::DT_RUNPATH) => runpath.extend(text(d)),
            _ => {}
        }
    }
    // RPATH counts only without a RUNPATH (ld.so(8)).
    let search = if runpath.is_empty() { rpath } else { runpath };
    for d in search.iter().flat_map(|s| s.split(':')) {
        let usable = d.starts_with('/') || d.starts_with("$ORIGIN") || d.starts_with("${ORIGIN}");
        let d = PathBuf::from(d);
        if usable
            && d.as_os_str().len() <= PATH_MAX
            && !w.dirs.contains(&d)
            && w.dirs.len() < MAX_DIRS
        {
            w.dirs.push(d);
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a file of `bytes` wants.
    fn of(bytes: &[u8]) -> Wants {
        let mut f = tempfile::tempfile().unwrap();
        std::io::Write::write_all(&mut f, bytes).unwrap();
        wants(&f)
    }

    #[test]
    fn a_scripts_interpreter_and_envs_command_are_wanted() {
        let w = of(b"#!/bin/sh -e\necho hi\n");
        assert_eq!(w.paths, vec![PathBuf::from("/bin/sh")]);
        assert_eq!(w.command, None);
        let w = of(b"#!/usr/bin/env python3\n");
        assert_eq!(w.paths, vec![PathBuf::from("/usr/bin/env")]);
        assert_eq!(w.command.as_deref(), Some("python3"));
        // env's options and assignments are not commands; a relative
        // interpreter is not one the kernel runs.
        assert_eq!(of(b"#!/usr/bin/env -S python3 -u\n").command, None);
        assert_eq!(of(b"#!/usr/bin/env A=1 sh\n").command, None);
        assert_eq!(of(b"#!sh\n"), Wants::default());
        assert_eq!(of(b"#!"), Wants::default());
        assert_eq!(of(b"plain text"), Wants::default());
    }

    #[test]
    fn origin_is_the_objects_directory() {
        let o = Path::new("/usr/local/bin");
        assert_eq!(
            expand_origin(Path::new("$ORIGIN/../lib"), o),
            PathBuf::from("/usr/local/bin/../lib")
        );
        assert_eq!(
            expand_origin(Path::new("${ORIGIN}/x"), o),
            PathBuf::from("/usr/local/bin/x")
        );
    }

    #[test]
    fn an_elfs_loader_and_needed_libraries_are_read_from_its_program_headers() {
        // This host's dash (Debian's /bin/sh) stands in for an image's.
        let dash = std::fs::read("/usr/bin/dash").unwrap();
        let w = of(&dash);
        assert!(w.dynamic, "{w:?}");
        assert_eq!(w.paths, vec![PathBuf::from("/lib64/ld-linux-x86-64.so.2")]);
        assert_eq!(w.libraries, vec!["libc.so.6".to_string()]);
        // Stripped of its section headers, the answer is the same.
        let mut stripped = dash.clone();
        stripped[0x28..0x30].fill(0); // e_shoff
        stripped[0x3c..0x40].fill(0); // e_shnum, e_shstrndx
        assert_eq!(of(&stripped), w);
    }

    /// A little-endian ELF64 file: one PT_LOAD over all of it, a PT_INTERP,
    /// a PT_DYNAMIC of `dyns` (tag, string or value) and their strings.
    fn elf64(interp: &str, dyns: &[(i64, &str)]) -> Vec<u8> {
        let (phoff, phnum) = (64u64, 3u64);
        let interp_at = phoff + 56 * phnum;
        let mut strtab = vec![0u8];
        let mut entries = Vec::new();
        for (tag, text) in dyns {
            let value = match *tag {
                // Not a string: the value as written.
                t if t == E::DT_NULL as i64 => 0,
                _ => {
                    strtab.extend_from_slice(text.as_bytes());
                    strtab.push(0);
                    (strtab.len() - text.len() - 1) as u64
                }
            };
            entries.push((*tag, value));
        }
        let str_at = (interp_at + interp.len() as u64 + 1).next_multiple_of(8);
        let dyn_at = (str_at + strtab.len() as u64).next_multiple_of(8);
        // First, as linkers put them: before any DT_NULL of the test's.
        entries.insert(0, (E::DT_STRTAB as i64, str_at));
        entries.insert(1, (E::DT_STRSZ as i64, strtab.len() as u64));
        let end = dyn_at + 16 * entries.len() as u64;
        let mut f = vec![0u8; end as usize];
        f[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
        let put = |f: &mut Vec<u8>, at: u64, bytes: &[u8]| {
            f[at as usize..at as usize + bytes.len()].copy_from_slice(bytes)
        };
        put(&mut f, 16, &3u16.to_le_bytes()); // ET_DYN
        put(&mut f, 18, &62u16.to_le_bytes()); // x86_64
        put(&mut f, 20, &1u32.to_le_bytes());
        put(&mut f, 32, &phoff.to_le_bytes());
        put(&mut f, 52, &64u16.to_le_bytes());
        put(&mut f, 54, &56u16.to_le_bytes());
        put(&mut f, 56, &(phnum as u16).to_le_bytes());
        let segments = [
            (E::PT_LOAD, 0, end),
            (E::PT_INTERP, interp_at, interp.len() as u64 + 1),
            (E::PT_DYNAMIC, dyn_at, end - dyn_at),
        ];
        for (i, (kind, off, size)) in segments.into_iter().enumerate() {
            let at = phoff + 56 * i as u64;
            put(&mut f, at, &kind.to_le_bytes());
            for (field, v) in [(8, off), (16, off), (24, off), (32, size), (40, size)] {
                put(&mut f, at + field, &v.to_le_bytes());
            }
        }
        put(&mut f, interp_at, interp.as_bytes());
        put(&mut f, str_at, &strtab);
        for (i, (tag, value)) in entries.iter().enumerate() {
            let at = dyn_at + 16 * i as u64;
            put(&mut f, at, &tag.to_le_bytes());
            put(&mut f, at + 8, &value.to_le_bytes());
        }
        f
    }

    #[test]
    fn runpath_hides_rpath_and_names_are_bounded() {
        let (needed, rpath, runpath) = (
            E::DT_NEEDED as i64,
            E::DT_RPATH as i64,
            E::DT_RUNPATH as i64,
        );
        let w = elf(&*elf64(
            "/lib/ld.so",
            &[
                (needed, "libz.so.1"),
                (rpath, "/opt/r:relative"),
                (needed, "/abs/libx.so"),
            ],
        ));
        assert_eq!(
            w.paths,
            [PathBuf::from("/lib/ld.so"), "/abs/libx.so".into()]
        );
        assert_eq!(w.libraries, ["libz.so.1"]);
        assert_eq!(w.dirs, [PathBuf::from("/opt/r")]);
        let w = elf(&*elf64(
            "/lib/ld.so",
            &[
                (rpath, "/opt/r"),
                (runpath, "$ORIGIN/../lib:/x"),
                (needed, "libz.so.1"),
            ],
        ));
        assert_eq!(w.dirs, [PathBuf::from("$ORIGIN/../lib"), "/x".into()]);
        // Entries after DT_NULL are not read; many names are cut short.
        let w = elf(&*elf64(
            "/lib/ld.so",
            &[(needed, "liba.so"), (0, ""), (needed, "libb.so")],
        ));
        assert_eq!(w.libraries, ["liba.so"]);
        let names: Vec<String> = (0..1000).map(|i| format!("lib{i}.so")).collect();
        let many: Vec<(i64, &str)> = names.iter().map(|n| (needed, n.as_str())).collect();
        let w = elf(&*elf64("/lib/ld.so", &many));
        assert!(
            w.libraries.len() <= MAX_LIBRARIES + 1,
            "{}",
            w.libraries.len()
        );
    }

    #[test]
    fn a_broken_dynamic_segment_keeps_the_loader() {
        let mut f = elf64("/lib/ld.so", &[(E::DT_NEEDED as i64, "libz.so.1")]);
        // The PT_LOAD (the first program header) no longer holds the
        // string table: its size cut to the headers.
        f[64 + 32..64 + 48]
            .copy_from_slice(&[&64u64.to_le_bytes()[..], &64u64.to_le_bytes()[..]].concat());
        let w = elf(&*f);
        assert_eq!(w.paths, [PathBuf::from("/lib/ld.so")]);
        assert!(w.libraries.is_empty(), "{w:?}");
        // Offsets near the end of the address space: refused, no overflow.
        let mut f = elf64("/lib/ld.so", &[(E::DT_NEEDED as i64, "libz.so.1")]);
        for ph in 0..3 {
            let at = 64 + 56 * ph + 8;
            f[at..at + 8].copy_from_slice(&(u64::MAX - 4).to_le_bytes());
        }
        let w = elf(&*f);
        assert!(w.libraries.is_empty() && w.paths.is_empty(), "{w:?}");
    }

    #[test]
    fn truncated_or_corrupt_elf_files_are_read_and_not_followed() {
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        // Called directly: a panic fails the test (wants() would catch it).
        for cut in [4, 16, 64, 200, 1000, 4096] {
            let w = elf(&me[..cut.min(me.len())]);
            assert!(w.libraries.is_empty(), "cut at {cut}: {w:?}");
        }
        let mut bad = me[..8192.min(me.len())].to_vec();
        for (i, b) in bad.iter_mut().enumerate().skip(16) {
            *b = b.wrapping_mul(31).wrapping_add(i as u8);
        }
        assert!(elf(&*bad).paths.is_empty());
    }

    /// This host's own /bin/sh stands in for an image's program: its loader,
    /// libc and ld.so.cache are read, each once, within the budget.
    #[test]
    fn a_dynamic_program_brings_its_loader_and_libraries() {
        let root = Root::open("/").unwrap();
        let sh = PathBuf::from("/bin/sh");
        let w = warm(&root, &[sh.clone(), sh.clone()], "/usr/bin:/bin", 64 << 20);
        // Each file once: the same program twice is read as once.
        assert_eq!(
            w,
            warm(&root, std::slice::from_ref(&sh), "/usr/bin:/bin", 64 << 20)
        );
        let size = std::fs::metadata("/bin/sh").unwrap().len();
        let dynamic = of(&std::fs::read("/bin/sh").unwrap()).dynamic;
        if dynamic {
            assert!(w.files >= 3, "{w:?}: sh, its loader, libc at least");
            assert!(w.bytes > size, "{w:?}");
        } else {
            let want = Warmed {
                files: 1,
                bytes: size,
            };
            assert_eq!(w, want);
        }
        // The budget bounds it, the program read first.
        let small = warm(&root, &[sh], "/usr/bin:/bin", size);
        assert_eq!(
            small,
            Warmed {
                files: 1,
                bytes: size
            }
        );
    }
}
