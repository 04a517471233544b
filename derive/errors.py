"""Errors a user can cause: each carries a one-line message that names the problem."""

from __future__ import annotations


class DeriveError(Exception):
    """Base class of every error derive reports to a user (CLI exit code 2, no traceback)."""

    exit_code = 2


class OpDefinitionError(DeriveError):
    """The forward definition of an op is malformed (dims, dtypes, unsupported functions)."""


class UnknownOpError(DeriveError):
    """No op of that name in the catalogue, or no such file / function for PATH.py:FUNC."""


class NotDifferentiableError(DeriveError):
    """A SymPy function in the op has no derivative derive can use."""


class OutputPathError(DeriveError):
    """An output path would escape the output directory or is not writable."""


class DeviceError(DeriveError):
    """A torch device named for verification that this machine cannot use."""


class VerificationError(DeriveError):
    """The generated code disagrees with autograd or with the exact check."""

    exit_code = 1
