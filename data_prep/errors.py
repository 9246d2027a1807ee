"""atlas-prep's user error, kept in a module of its own so encoder processes can import it without the rest."""


class PrepError(Exception):
    """A user error in atlas-prep's inputs or flags; the CLI prints it as one line."""
