from nbdloop.cli.main import main

main()
