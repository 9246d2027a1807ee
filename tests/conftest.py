"""Session-wide test set-up."""

# DeepSpeed's logger binds a StreamHandler to whatever sys.stdout is when deepspeed is first imported. Imported
# inside a test that uses capsys, that is the test's capture buffer, closed afterwards, and every later DeepSpeed log
# line becomes a "--- Logging error ---" traceback on stderr (breaking tests that check a one-line error). Importing
# it here binds the handler to the session's stream instead.
import deepspeed  # noqa: F401
