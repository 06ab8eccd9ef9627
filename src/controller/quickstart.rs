//! The quickstart (being written).
