//! What `load` reads from: an OCI layout directory, or a tar archive (plain or gzip) holding an
//! OCI layout or a `docker save` tree. Archive members are copied once into the store's
//! staging directory (hashing as they go), so later steps read every source the same way.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use super::unpack::{detect_compression, short, Compression, HashingReader};
use super::{ImageError, MAX_JSON_BYTES};

/// Most members an image archive may hold.
pub const MAX_ARCHIVE_ENTRIES: u64 = 100_000;
/// Most link hops followed when resolving a link member of an archive.
const MAX_ALIAS_HOPS: usize = 8;

/// One file of the source, readable at `path`.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// Where its bytes are now.
    pub path: PathBuf,
    /// `sha256:<hex>` when already computed (archive members).
    pub digest: Option<String>,
    /// Size in bytes.
    pub size: u64,
}

/// An image source being loaded.
pub enum Source {
    /// An OCI layout directory on disk.
    Dir(PathBuf),
    /// Members of an archive, staged; keyed by normalised member name.
    Archive(HashMap<String, SourceFile>),
}

/// Normalise a member name: no leading `/` or `./`, no `..`.
fn normalise(name: &str) -> Option<String> {
    let mut parts = Vec::new();
    for c in name.split('/') {
        match c {
            "" | "." => {}
            ".." => return None,
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

impl Source {
    /// Open `path` (a directory or an archive), staging archive members under `staging`.
    pub fn open(path: &Path, staging: &Path) -> Result<Source, ImageError> {
        let meta = std::fs::metadata(path)
            .map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
        if meta.is_dir() {
            return Ok(Source::Dir(path.to_path_buf()));
        }
        let file =
            File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
        let corrupt = |e: io::Error| {
            ImageError::Invalid(format!(
                "{}: not a readable tar archive: {}",
                path.display(),
                short(&e)
            ))
        };
        let mut buffered = BufReader::new(file);
        let reader: Box<dyn Read> = match detect_compression(&mut buffered).map_err(corrupt)? {
            Compression::None => Box::new(buffered),
            Compression::Gzip => Box::new(flate2::bufread::GzDecoder::new(buffered)),
            Compression::Zstd => Box::new(super::unpack::zstd_reader(buffered).map_err(corrupt)?),
        };
        let mut archive = tar::Archive::new(reader);
        let mut files: HashMap<String, SourceFile> = HashMap::new();
        let mut aliases: HashMap<String, String> = HashMap::new();
        let mut count = 0u64;
        for entry in archive.entries().map_err(corrupt)? {
            let mut entry = entry.map_err(corrupt)?;
            count += 1;
            if count > MAX_ARCHIVE_ENTRIES {
                return Err(ImageError::TooLarge {
                    what: "image archive member count".into(),
                    limit: MAX_ARCHIVE_ENTRIES,
                });
            }
            let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            let Some(name) = normalise(&raw) else {
                return Err(ImageError::Invalid(format!(
                    "archive member {raw:?} has a '..' component"
                )));
            };
            match entry.header().entry_type() {
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let staged = staging.join(format!("member-{count}"));
                    let mut out = File::create(&staged)
                        .map_err(|e| ImageError::io(format!("create {}", staged.display()), e))?;
                    let mut hashing = HashingReader::new(&mut entry);
                    io::copy(&mut hashing, &mut out).map_err(corrupt)?;
                    let (digest, size) = hashing.finish().map_err(corrupt)?;
                    // Made durable by the load's one syncfs before anything is committed.
                    out.flush()
                        .map_err(|e| ImageError::io(format!("write {}", staged.display()), e))?;
                    aliases.remove(&name);
                    files.insert(
                        name,
                        SourceFile {
                            path: staged,
                            digest: Some(digest),
                            size,
                        },
                    );
                }
                kind @ (tar::EntryType::Symlink | tar::EntryType::Link) => {
                    let target = entry
                        .link_name_bytes()
                        .map(|t| String::from_utf8_lossy(&t).into_owned())
                        .unwrap_or_default();
                    // docker save links duplicate layers: symlinks relative to the member's
                    // directory, hardlinks relative to the archive root.
                    let joined = if kind == tar::EntryType::Symlink && !target.starts_with('/') {
                        match name.rsplit_once('/') {
                            Some((dir, _)) => format!("{dir}/{target}"),
                            None => target,
                        }
                    } else {
                        target
                    };
                    if let Some(t) = normalise(&joined) {
                        files.remove(&name);
                        aliases.insert(name, t);
                    }
                }
                _ => {}
            }
        }
        for (name, first) in &aliases {
            let mut target = first.clone();
            for _ in 0..MAX_ALIAS_HOPS {
                if let Some(f) = files.get(&target).cloned() {
                    files.insert(name.clone(), f);
                    break;
                }
                match aliases.get(&target) {
                    Some(next) => target = next.clone(),
                    None => break,
                }
            }
        }
        Ok(Source::Archive(files))
    }

    /// The file at member name `name`, if the source has it.
    pub fn get(&self, name: &str) -> Result<Option<SourceFile>, ImageError> {
        let Some(name) = normalise(name) else {
            return Err(ImageError::Invalid(format!(
                "path {name:?} has a '..' component"
            )));
        };
        match self {
            Source::Archive(files) => Ok(files.get(&name).cloned()),
            Source::Dir(root) => {
                let path = root.join(&name);
                match std::fs::metadata(&path) {
                    Ok(m) if m.is_file() => Ok(Some(SourceFile {
                        path,
                        digest: None,
                        size: m.len(),
                    })),
                    Ok(_) => Ok(None),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(ImageError::io(format!("stat {}", path.display()), e)),
                }
            }
        }
    }

    /// Read a small JSON member whole (bounded by MAX_JSON_BYTES).
    pub fn read_small(&self, name: &str) -> Result<Option<Vec<u8>>, ImageError> {
        match self.get(name)? {
            None => Ok(None),
            Some(f) => read_bounded(&f.path, name).map(Some),
        }
    }
}

/// Read a whole file that must be at most MAX_JSON_BYTES.
pub fn read_bounded(path: &Path, what: &str) -> Result<Vec<u8>, ImageError> {
    let file =
        File::open(path).map_err(|e| ImageError::io(format!("open {}", path.display()), e))?;
    let mut buf = Vec::new();
    file.take(MAX_JSON_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| ImageError::io(format!("read {}", path.display()), e))?;
    if buf.len() as u64 > MAX_JSON_BYTES {
        return Err(ImageError::TooLarge {
            what: what.to_string(),
            limit: MAX_JSON_BYTES,
        });
    }
    Ok(buf)
}
