"""Small shared helpers for the integration tests: real digit images from the project's one
digits loader (`smooth_infonce.integrations.digits`, scikit-learn's bundled digits, no download)."""

from smooth_infonce.integrations.digits import digit_images

__all__ = ["digit_images"]
