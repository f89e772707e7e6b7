//! Whole-model tests (to come).
