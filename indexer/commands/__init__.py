"""The indexer's subcommands of ``recommender``: each module's ``add_arguments`` and ``run``.

``recommender.cli`` lists them in its command table and imports one only to build the parser
or run it; the jobs they call live one level up (``indexer.build``, ``indexer.rebuild``,
``indexer.artifacts``). ``evaluate`` and ``demo`` keep their pair beside their job.
"""
