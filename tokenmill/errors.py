"""The errors tokenmill raises; each message says what is wrong and how to fix it."""


class TokenmillError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class InputError(TokenmillError):
    """The input file, a column or an option is unusable."""


class OutputError(TokenmillError):
    """The output folder cannot be written (full disk, permissions, another job's results)."""


class TemplateError(TokenmillError):
    """A prompt or chat template cannot be loaded or rendered."""


class TemplateSecurityError(TemplateError):
    """A template tried to reach something the sandbox forbids."""


class SchemaError(TokenmillError):
    """A JSON schema or job spec is invalid or uses what tokenmill cannot constrain."""


class ModelError(TokenmillError):
    """The model file is missing, unreadable or unsupported."""


class WorkerDied(TokenmillError):
    """A model worker process ended while rows were in flight."""
