"""The ``editlens`` command line (see ``editlens --help``)."""
