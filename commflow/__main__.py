from commflow.cli import main

main()
