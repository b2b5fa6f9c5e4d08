//! The check that a binary can run alone in an empty image: a 64-bit x86 ELF executable
//! without a program interpreter (`PT_INTERP`), i.e. statically linked.

use std::fs::File;
use std::path::{Path, PathBuf};

use object::elf::{EM_X86_64, FileHeader64, PT_INTERP};
use object::read::ReadCache;
use object::read::elf::{FileHeader, ProgramHeader};
use object::{Endianness, ReadRef};

/// Why a binary cannot go into an image.
#[derive(Debug, thiserror::Error)]
pub enum ElfError {
    /// The file cannot be opened.
    #[error("cannot open the binary {path}: {source}")]
    Open {
        /// The binary.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// The file is not a 64-bit ELF file.
    #[error("the binary {path} is not a 64-bit ELF file: {source}")]
    NotElf {
        /// The binary.
        path: PathBuf,
        /// What the ELF reader said.
        source: object::read::Error,
    },
    /// The file is built for another machine than x86_64 (the images are linux/amd64).
    #[error(
        "the binary {path} is built for ELF machine {machine}, not x86_64 (EM_X86_64 = 62): the images are linux/amd64"
    )]
    NotAmd64 {
        /// The binary.
        path: PathBuf,
        /// Its `e_machine`.
        machine: u16,
    },
    /// The file is dynamically linked: it names a program interpreter.
    #[error(
        "the binary {path} is dynamically linked (PT_INTERP {interpreter}); an image without a libc needs a static binary: build it with --target x86_64-unknown-linux-musl"
    )]
    Dynamic {
        /// The binary.
        path: PathBuf,
        /// The interpreter it names, e.g. `/lib64/ld-linux-x86-64.so.2`.
        interpreter: String,
    },
}

/// Checks that `path` is a static x86_64 ELF executable: no `PT_INTERP` segment.
pub fn check_static(path: &Path) -> Result<(), ElfError> {
    let file = File::open(path).map_err(|source| ElfError::Open {
        path: path.to_owned(),
        source,
    })?;
    let cache = ReadCache::new(file);
    let not_elf = |source| ElfError::NotElf {
        path: path.to_owned(),
        source,
    };
    let header = FileHeader64::<Endianness>::parse(&cache).map_err(not_elf)?;
    let endian = header.endian().map_err(not_elf)?;
    let machine = header.e_machine(endian);
    if machine != EM_X86_64 {
        return Err(ElfError::NotAmd64 {
            path: path.to_owned(),
            machine,
        });
    }
    for segment in header.program_headers(endian, &cache).map_err(not_elf)? {
        if segment.p_type(endian) == PT_INTERP {
            let interpreter = cache
                .read_bytes_at(segment.p_offset(endian), segment.p_filesz(endian))
                .map(|bytes| {
                    String::from_utf8_lossy(bytes)
                        .trim_end_matches('\0')
                        .to_owned()
                })
                .unwrap_or_else(|()| "(unreadable)".to_owned());
            return Err(ElfError::Dynamic {
                path: path.to_owned(),
                interpreter,
            });
        }
    }
    Ok(())
}
