//! Files: a shard source over a directory, atomic pack output, manifest reading, shard
//! verification, and a seek-based reader for input safetensors files. Not built for wasm.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::manifest::{MAX_MANIFEST_BYTES, Manifest, ManifestError, ShardEntry, hex};
use crate::safetensors_header::{HeaderError, HeaderTensor, ShardHeader, header_len};
use crate::writer::PackOutput;

/// Name of the manifest inside a model directory.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A file-level failure, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: {source}")]
    Manifest {
        path: PathBuf,
        source: ManifestError,
    },
    #[error("{path}: {source}")]
    Header { path: PathBuf, source: HeaderError },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Reads and validates a manifest; `path` is the manifest or the directory holding it.
/// Returns the manifest and the directory its files live in.
pub fn read_manifest(path: &Path) -> Result<(Manifest, PathBuf), FileError> {
    let file = if path.is_dir() {
        path.join(MANIFEST_FILE)
    } else {
        path.to_owned()
    };
    let dir = file
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let len = fs::metadata(&file).map_err(io_err(&file))?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(FileError::Manifest {
            path: file,
            source: ManifestError::TooLarge(len),
        });
    }
    let bytes = fs::read(&file).map_err(io_err(&file))?;
    let manifest = Manifest::from_json(&bytes).map_err(|source| FileError::Manifest {
        path: file.clone(),
        source,
    })?;
    Ok((manifest, dir))
}

/// Shards from files in one directory.
#[derive(Debug, Clone)]
pub struct DirSource {
    pub dir: PathBuf,
}

impl crate::loader::ShardSource for DirSource {
    type Error = FileError;
    async fn shard(&mut self, _: usize, entry: &ShardEntry) -> Result<Vec<u8>, FileError> {
        read_bounded(&self.dir.join(&entry.file), entry.bytes)
    }
}

/// Reads a file expected to be `expected` bytes: never allocates more than the smaller of that
/// and the file's real size, and reads one byte past `expected` so a longer file shows up.
pub fn read_bounded(path: &Path, expected: u64) -> Result<Vec<u8>, FileError> {
    let file = File::open(path).map_err(io_err(path))?;
    let len = file.metadata().map_err(io_err(path))?.len();
    let cap = usize::try_from(len.min(expected).saturating_add(1)).unwrap_or(0);
    let mut bytes = Vec::with_capacity(cap);
    file.take(expected.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    Ok(bytes)
}

/// One problem found by [`verify_dir`].
#[derive(Debug, Clone, PartialEq)]
pub struct BadFile {
    pub file: String,
    pub problem: String,
}

/// Checks the size and sha256 of every shard (and the tokenizer) in `dir`, streaming each file
/// in 1 MiB pieces. Returns the bad ones; empty means all good.
pub fn verify_dir(manifest: &Manifest, dir: &Path) -> Vec<BadFile> {
    let mut entries: Vec<(&str, u64, &str)> = manifest
        .shards
        .iter()
        .map(|s| (s.file.as_str(), s.bytes, s.sha256.as_str()))
        .collect();
    if let Some(t) = &manifest.tokenizer {
        entries.push((&t.file, t.bytes, &t.sha256));
    }
    let mut bad = Vec::new();
    for (file, bytes, sha256) in entries {
        let problem = match hash_file(&dir.join(file)) {
            Err(e) => Some(e.to_string()),
            Ok((len, _)) if len != bytes => Some(format!("{len} bytes, the manifest says {bytes}")),
            Ok((_, sha)) if sha != sha256 => {
                Some(format!("sha256 {sha}, the manifest says {sha256}"))
            }
            Ok(_) => None,
        };
        if let Some(problem) = problem {
            bad.push(BadFile {
                file: file.to_owned(),
                problem,
            });
        }
    }
    bad
}

/// Length and lowercase hex sha256 of a file.
pub fn hash_file(path: &Path) -> io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex(&hasher.finalize())))
}

/// Writes packed files into a directory: each through a temp file in the same directory,
/// fsync, rename, then fsync of the directory, so a crash leaves either the whole file or none.
#[derive(Debug, Clone)]
pub struct DirOutput {
    pub dir: PathBuf,
}

impl DirOutput {
    /// Creates the directory if needed.
    pub fn create(dir: &Path) -> Result<DirOutput, FileError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        Ok(DirOutput {
            dir: dir.to_owned(),
        })
    }

    fn write_atomic(&self, file: &str, bytes: &[u8]) -> Result<(), FileError> {
        let target = self.dir.join(file);
        let tmp = self.dir.join(format!(".{file}.tmp-{}", std::process::id()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(bytes)?;
            f.sync_all()?;
            drop(f);
            fs::rename(&tmp, &target)?;
            // The rename itself is durable only once the directory is synced.
            File::open(&self.dir)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result.map_err(io_err(&target))
    }
}

impl PackOutput for DirOutput {
    type Error = FileError;
    fn write_blob(&mut self, file: &str, bytes: &[u8]) -> Result<(), FileError> {
        // Content-addressed: a file of the right name and size is already this content
        // (`inspect --verify` checks the hash).
        let target = self.dir.join(file);
        if fs::metadata(&target).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(());
        }
        self.write_atomic(file, bytes)
    }
    fn write_manifest(&mut self, json: &[u8]) -> Result<(), FileError> {
        self.write_atomic(MANIFEST_FILE, json)
    }
}

/// An input safetensors file read tensor by tensor (packing multi-GB checkpoints without
/// holding them in memory).
#[derive(Debug)]
pub struct SafetensorsFile {
    path: PathBuf,
    file: File,
    pub header: ShardHeader,
}

impl SafetensorsFile {
    /// Opens a file and parses its header (checked against the file's real length).
    pub fn open(path: &Path) -> Result<SafetensorsFile, FileError> {
        let mut file = File::open(path).map_err(io_err(path))?;
        let total = file.metadata().map_err(io_err(path))?.len();
        let mut prefix = [0u8; 8];
        if total < 8 {
            return Err(FileError::Header {
                path: path.to_owned(),
                source: HeaderError::TooShort { len: total },
            });
        }
        file.read_exact(&mut prefix).map_err(io_err(path))?;
        let n = header_len(prefix, total).map_err(|source| FileError::Header {
            path: path.to_owned(),
            source,
        })?;
        let mut json = vec![0u8; n];
        file.read_exact(&mut json).map_err(io_err(path))?;
        let header = ShardHeader::parse_json(&json, total - 8 - n as u64).map_err(|source| {
            FileError::Header {
                path: path.to_owned(),
                source,
            }
        })?;
        Ok(SafetensorsFile {
            path: path.to_owned(),
            file,
            header,
        })
    }

    /// The bytes of one tensor of this file's header.
    pub fn read(&mut self, tensor: &HeaderTensor) -> Result<Vec<u8>, FileError> {
        let len = usize::try_from(tensor.end - tensor.begin).map_err(|_| FileError::Io {
            path: self.path.clone(),
            source: io::Error::other(format!("tensor `{}` is too large", tensor.name)),
        })?;
        let mut bytes = vec![0u8; len];
        self.file
            .seek(SeekFrom::Start(self.header.data_start + tensor.begin))
            .map_err(io_err(&self.path))?;
        self.file
            .read_exact(&mut bytes)
            .map_err(io_err(&self.path))?;
        Ok(bytes)
    }
}
