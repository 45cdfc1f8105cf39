from prunecomp_export.cli import main

main()
