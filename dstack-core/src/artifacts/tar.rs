//! Tar archives of artifacts, written entry by entry as their content streams from the
//! store: what `depends-on` puts into a job (an archive of the issue-25 kind, unpacked like
//! `files:`) and what a download through the server carries.

use std::io::{self, Write};
use std::path::Path;

use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::{ArtifactError, ArtifactStore, FileEntry};
use crate::archive::Packed;

/// The two zero blocks that end an archive.
pub const END: [u8; 1024] = [0; 1024];

/// The header and padding of one regular file of an archive (fixed owner and time, so the
/// same files always make the same archive).
pub struct Header {
    /// The 512-byte header.
    pub bytes: Vec<u8>,
    /// How many zero bytes follow the content.
    pub padding: usize,
}

impl Header {
    /// The header of `entry` (paths up to ustar's 255 bytes).
    pub fn of(entry: &FileEntry) -> io::Result<Header> {
        let mut header = tar::Header::new_ustar();
        header.set_path(&entry.path)?;
        header.set_size(entry.size);
        header.set_mode(entry.mode & 0o7777);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        Ok(Header {
            bytes: header.as_bytes().to_vec(),
            padding: ((512 - entry.size % 512) % 512) as usize,
        })
    }
}

/// Writes an archive of `files` (in path order) from the store's content into a new file of
/// `temp_dir`: the content streams through, hashed on its way; a file whose content is not
/// what its entry says fails it.
pub async fn pack(
    store: &ArtifactStore,
    files: &[FileEntry],
    temp_dir: &Path,
) -> Result<Packed, ArtifactError> {
    std::fs::create_dir_all(temp_dir)?;
    let file = temp_dir.join(format!(".deps-{}", uuid::Uuid::new_v4().simple()));
    let written = write(store, files, &file).await;
    match written {
        Ok((hash, bytes)) => Ok(Packed { hash, bytes, file }),
        Err(e) => {
            let _ = std::fs::remove_file(&file);
            Err(e)
        }
    }
}

async fn write(
    store: &ArtifactStore,
    files: &[FileEntry],
    file: &Path,
) -> Result<(String, u64), ArtifactError> {
    let mut sorted: Vec<&FileEntry> = files.iter().collect();
    sorted.sort_by(|a, b| a.path.cmp(&b.path));
    let mut out = io::BufWriter::new(std::fs::File::create(file)?);
    let mut archive = Sha256::new();
    let mut bytes = 0u64;
    let mut put = |out: &mut io::BufWriter<std::fs::File>, data: &[u8]| -> io::Result<()> {
        archive.update(data);
        bytes += data.len() as u64;
        out.write_all(data)
    };
    for entry in sorted {
        let header = Header::of(entry)?;
        put(&mut out, &header.bytes)?;
        let mut content = Sha256::new();
        let mut stream = store.read(&entry.hash).await?;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            content.update(&chunk);
            put(&mut out, &chunk)?;
        }
        if hex(&content.finalize()) != entry.hash {
            return Err(ArtifactError::Invalid(format!(
                "the stored content of {} is not {}",
                entry.path, entry.hash
            )));
        }
        put(&mut out, &vec![0u8; header.padding])?;
    }
    put(&mut out, &END)?;
    out.flush()?;
    Ok((hex(&archive.finalize()), bytes))
}

/// Lowercase hex of `bytes`.
pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
