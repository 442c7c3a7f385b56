"""The compressed-artifact codec, study storage and the artifact store."""
