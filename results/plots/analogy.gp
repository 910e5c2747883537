if (strstrt(GPVAL_TERMINALS, 'pngcairo') > 0) { set terminal pngcairo size 900,560 } else { set terminal png size 900,560 }
set termoption noenhanced
set output 'results/analogy.png'
datafile = 'results/plots/analogy.dat'
set title 'Sub-population analogies (test, mean over targets and seeds)'
set style fill solid 0.6
set boxwidth 0.6
set yrange [0:1.08]
set ylabel 'accuracy'
unset key
set xtics rotate by 20 right
set grid y
plot datafile using 0:2:xtic(1) with boxes, '' using 0:($2+0.03):(sprintf('%.3f',$2)) with labels
