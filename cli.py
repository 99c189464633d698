"""Run the zmqlab CLI from a checkout: ``python cli.py up`` is ``zmqlab up``."""

from zmqlab.cli import main

if __name__ == "__main__":
    main()
