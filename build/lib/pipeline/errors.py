"""The one exception that means "the user's mistake"."""


class InputError(ValueError):
    """A mistake in the input, the config, the arguments, a URI, the credentials, or an output
    another job holds: the message says what to fix. The job exits 2 with that one line. Any
    other exception (a ValueError of numpy, pyarrow or faiss among them) is a failure of the
    job itself: it exits 1 with its traceback. A ValueError, so that callers that caught the
    old ValueError still catch it."""
