from sparsebench.cli.app import main

main()
