"""Register banks: one declarative table per function type, and the bank that
enforces the guest's access semantics and gives the save path full access."""
