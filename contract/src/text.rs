//! Text cut to size for what the agent echoes back: excerpts of untrusted
//! input quoted in errors and acks, error texts bounded to what an answer
//! may carry, and hex. A leaf: the contract, the config checks and the
//! image code all use it, and it uses none of them.

/// Longest error text in an Item or ErrorReport, in bytes: texts quoting
/// the input are cut to this.
pub const MAX_ERROR_TEXT: usize = 1024;

/// At most `max` bytes of untrusted `s` (cut at a character boundary), to
/// quote in an error or ack without echoing a huge string.
pub fn excerpt(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `text` cut to [`MAX_ERROR_TEXT`] bytes (at a character boundary), saying
/// how much was left out.
pub fn bounded_text(mut text: String) -> String {
    if text.len() > MAX_ERROR_TEXT {
        let total = text.len();
        let end = excerpt(&text, MAX_ERROR_TEXT - 64).len();
        text.truncate(end);
        text.push_str(&format!("… ({} more bytes cut)", total - end));
    }
    text
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
