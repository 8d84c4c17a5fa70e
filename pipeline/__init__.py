"""dialect-circuits: find which components of a language model carry its prejudice against
African American English, from matched guise prompts to activation patching."""

__version__ = "0.1.0"
