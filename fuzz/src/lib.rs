//! Helpers shared by the fuzz targets.

/// Splits a fuzz input into text fields at 0xFF bytes.
///
/// 0xFF never occurs in UTF-8, so every string (NUL, newlines and all) fits in a field, and seed
/// files stay readable: `printf '/\xffalice\xffgpu 1' > seed`. Fields that are not UTF-8 are
/// decoded lossily (U+FFFD), which still yields every possible `&str` the broker can be handed.
/// Missing fields are empty.
pub fn fields<const N: usize>(data: &[u8]) -> [String; N] {
    let mut parts = data.splitn(N, |&b| b == 0xFF);
    std::array::from_fn(|_| {
        parts
            .next()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default()
    })
}

/// Decodes `%XX` escapes; `None` for a malformed escape.
pub fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

/// An in-memory `Store`, so targets that build a whole broker touch no disk.
#[derive(Default)]
pub struct MemStore(pub std::sync::Mutex<std::collections::HashMap<String, tunnelbot::store::TunnelRecord>>);

impl tunnelbot::store::Store for MemStore {
    fn load(&self) -> anyhow::Result<Vec<tunnelbot::store::TunnelRecord>> {
        Ok(self.0.lock().unwrap().values().cloned().collect())
    }
    fn put(&self, record: &tunnelbot::store::TunnelRecord) -> anyhow::Result<()> {
        self.0.lock().unwrap().insert(record.id.clone(), record.clone());
        Ok(())
    }
    fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.0.lock().unwrap().remove(id);
        Ok(())
    }
}
