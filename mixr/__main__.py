from mixr.cli import main

main()
