"""Errors of recopt.export: each names the problem and what to do."""
from ..errors import RecoptError, VerificationError


class ExportError(RecoptError):
    """The model could not be exported in the asked format (e.g. an op with no ONNX translation)."""


class ParityError(VerificationError):
    """The exported artifact computes outputs that differ from PyTorch beyond tolerance."""


class ArtifactError(RecoptError):
    """An artifact cannot be loaded: no manifest, unknown format, or unsafe content."""


class TamperedArtifactError(ArtifactError):
    """An artifact's weights no longer match the checksum in its manifest."""


class SignatureError(ArtifactError):
    """An artifact is unsigned, or its signature does not verify with the given key."""
