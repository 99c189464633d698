from zmqlab.cli import main

main()
