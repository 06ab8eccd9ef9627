//! Operator API bodies (`/v1/...`): snake_case JSON, field names taken from the seed pages.

use serde::{Deserialize, Serialize};

use super::domain::ErrorCode;

mod fleet;
mod images;
mod tasks;

pub use fleet::*;
pub use images::*;
pub use tasks::*;

/// The response header of a list with more rows: the `cursor` of the next page (absent on
/// the last page).
pub const NEXT_CURSOR_HEADER: &str = "fieldhand-next-cursor";

/// Every error response: `{error_code, error_msg}` with the matching HTTP status.
#[derive(utoipa::ToSchema, Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error_code: ErrorCode,
    pub error_msg: String,
}
