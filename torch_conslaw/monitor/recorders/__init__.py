"""Recorders: where and when θ is read (``recording="auto" | "sync" | "snapshot" | "live"``)."""

from .choice import RECORDINGS, choose_recording, free_cores, recording_from_legacy

__all__ = ["RECORDINGS", "choose_recording", "free_cores", "recording_from_legacy"]
