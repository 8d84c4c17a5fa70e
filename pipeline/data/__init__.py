"""The dialect dataset: the package's pairs, templates and attributes, a CSV loader for the
notebook's format, and the builder that picks each prompt's attributes by matched guise probing."""
