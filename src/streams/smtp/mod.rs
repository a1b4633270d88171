//! The e-mail stream (`kind = "smtp"`).

pub(crate) mod template;
