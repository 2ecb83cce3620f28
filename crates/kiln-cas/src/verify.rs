//! A reader that checks content against its expected digest and size as it streams.

use std::io::{self, Read};

use kiln_types::{Digest, Sha256Writer};

use crate::CasError;

/// Wraps bytes from an untrusted source; reaching the end with the wrong digest or size is an
/// `InvalidData` error carrying a [`CasError`], so a corrupt transfer never looks complete.
pub struct VerifyingReader<R> {
    inner: R,
    expected: Digest,
    expected_size: Option<u64>,
    hasher: Sha256Writer,
    size: u64,
}

impl<R: Read> VerifyingReader<R> {
    /// Verifies `inner` against `expected` (and `expected_size` when known).
    pub fn new(inner: R, expected: Digest, expected_size: Option<u64>) -> Self {
        VerifyingReader { inner, expected, expected_size, hasher: Sha256Writer::new(), size: 0 }
    }

    fn check_end(&self) -> Result<(), CasError> {
        if let Some(expected) = self.expected_size
            && expected != self.size
        {
            return Err(CasError::SizeMismatch { digest: self.expected, expected, actual: self.size });
        }
        let actual = self.hasher.clone().finish();
        if actual != self.expected {
            return Err(CasError::DigestMismatch { expected: self.expected, actual, size: self.size });
        }
        Ok(())
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            self.check_end().map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            return Ok(0);
        }
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        if let Some(expected) = self.expected_size
            && self.size > expected
        {
            let error = CasError::SizeMismatch { digest: self.expected, expected, actual: self.size };
            return Err(io::Error::new(io::ErrorKind::InvalidData, error));
        }
        Ok(n)
    }
}
