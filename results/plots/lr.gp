if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 900,560 } else { set terminal png size 900,560 }
set termoption noenhanced
set output 'results/lr.png'
datafile = 'results/plots/lr.dat'
set title 'Fine-tuning learning rate (test)'
set logscale x
set xlabel 'learning rate'
set ylabel 'accuracy'
set key bottom left
set grid
plot datafile using 1:2 with linespoints title 'single task (absolute)', '' using 1:3 with linespoints title 'addition, pairs (normalized)', '' using 1:4 with linespoints title 'addition, all tasks (normalized)'
