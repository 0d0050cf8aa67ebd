"""The vLLM plugin: ``api_server`` runs in vLLM's API server process(es), ``model_runner``
in its model worker; ``session`` (the directory they and the trainer share) and
``trainability`` (whether this server's weights can train) serve both."""
