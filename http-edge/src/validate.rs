//! Input limits and format checks shared by every route.

use crate::error::ApiError;

pub const MAX_BODY_BYTES: usize = 64 * 1024;
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
pub const MAX_TEXT: usize = 1024;
pub const MAX_DESCRIPTION: usize = 8 * 1024;
pub const MAX_LIST: usize = 100;
pub const MAX_SPECS: usize = 32;
pub const MAX_QUANTITY: u64 = 10_000;
pub const MAX_STOCK: u64 = 1_000_000_000;
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// Ids match `[A-Za-z0-9._-]{1,64}`.
pub fn is_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

pub fn id(field: &str, s: &str) -> Result<(), ApiError> {
    if is_id(s) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "{field} must match [A-Za-z0-9._-]{{1,64}}"
        )))
    }
}

pub fn text(field: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.chars().count() > max {
        return Err(ApiError::bad_request(format!(
            "{field} is longer than {max} characters"
        )));
    }
    if s.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(ApiError::bad_request(format!(
            "{field} contains control characters"
        )));
    }
    Ok(())
}

pub fn required_text(field: &str, s: &str, max: usize) -> Result<(), ApiError> {
    if s.trim().is_empty() {
        return Err(ApiError::bad_request(format!("{field} must not be empty")));
    }
    text(field, s, max)
}

pub fn quantity(field: &str, q: i64) -> Result<u64, ApiError> {
    if q < 1 || q as u64 > MAX_QUANTITY {
        return Err(ApiError::bad_request(format!(
            "{field} must be between 1 and {MAX_QUANTITY}"
        )));
    }
    Ok(q as u64)
}

pub fn currency(c: &str) -> Result<(), ApiError> {
    if c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "currency must be an ISO 4217 code such as CNY",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(is_id("sku-1.A_b"));
        assert!(!is_id(""));
        assert!(!is_id(&"a".repeat(65)));
        assert!(!is_id("a/b"));
        assert!(!is_id("é"));
    }

    #[test]
    fn quantities() {
        assert!(quantity("q", 0).is_err());
        assert!(quantity("q", -1).is_err());
        assert!(quantity("q", 10_001).is_err());
        assert_eq!(quantity("q", 3).unwrap(), 3);
    }
}
