//! One module per subcommand family.

pub mod codec;
pub mod relay;
pub mod sim;
