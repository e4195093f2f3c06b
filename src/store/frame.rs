//! Checksummed frames, `len u32 | xxh3 u64 | body`: the unit of every append-only file
//! Tally writes (the store's log, the staging log). An append is fsynced and, when it
//! fails, cut back off, so a file only ever holds whole frames plus, after a crash, one
//! torn tail that readers recognize.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};

/// Appends one frame holding `body` at `*len`, durably; on failure cuts the file back
/// to `*len` so later frames stay readable.
pub fn append(file: &mut File, len: &mut u64, body: &[u8]) -> io::Result<()> {
    let len32 = u32::try_from(body.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame over 4 GiB"))?;
    let mut head = [0u8; 12];
    head[..4].copy_from_slice(&len32.to_le_bytes());
    head[4..].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(body).to_le_bytes());
    // Header and body written apart: an epoch's staging frame is tens of MB, not copied again.
    if let Err(e) = file
        .write_all(&head)
        .and_then(|()| file.write_all(body))
        .and_then(|()| file.sync_data())
    {
        let _ = file.set_len(*len);
        let _ = file.seek(SeekFrom::Start(*len));
        return Err(e);
    }
    *len += 12 + body.len() as u64;
    Ok(())
}

/// Reads the next frame's body: `Ok(None)` at a clean end, `InvalidData` for a torn
/// or corrupt frame.
pub fn read(r: &mut impl Read) -> io::Result<Option<Vec<u8>>> {
    let mut head = [0u8; 12];
    match r.read_exact(&mut head) {
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        other => other?,
    }
    let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
    let sum = u64::from_le_bytes(head[4..].try_into().expect("8 bytes"));
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "torn frame"))?;
    if xxhash_rust::xxh3::xxh3_64(&body) != sum {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "frame checksum mismatch",
        ));
    }
    Ok(Some(body))
}
